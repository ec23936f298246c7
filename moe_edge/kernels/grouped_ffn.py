"""The grouped SwiGLU expert FFN: one function for every place that runs experts.

Rows arrive sorted by group (expert slot). Group ``g`` owns rows
``[sum(group_sizes[:g]), sum(group_sizes[:g+1]))`` and runs ``down(silu(x @ gate) * (x @ up))``
with its own weights; rows at or past ``sum(group_sizes)`` belong to no group and return zero.
The gate and up projections are one matmul when the weights come fused as ``w_gate_up
[G, d, 2f]`` (gate in ``[..., :f]``, up in ``[..., f:]``, see :func:`fuse_gate_up`); a
``(w_gate, w_up)`` pair runs them as two.

Backends (:data:`BACKENDS`), chosen where the function is traced:

* ``"mosaic"``: tokamax's Pallas Mosaic GPU ``ragged_dot`` (Hopper). It computes only the row
  blocks of non-empty groups, so its time follows the rows and the experts actually used, not
  the slots held. bf16/fp16 only; rows it does not own are left uninitialised by the kernel and
  masked to zero here. tokamax is an optional dependency (``pip install -e '.[gpu]'``, Python
  >= 3.12, jax >= 0.11.1) imported only when this backend is first chosen.
* ``"lax"``: ``jax.lax.ragged_dot`` (every platform; XLA:GPU computes it densely over all groups).
* ``"auto"`` (default): ``"mosaic"`` on a Hopper GPU (compute capability 9.x) with bf16/fp16
  inputs when tokamax imports, ``"lax"`` otherwise.

Override per call (``backend=``) or for a region of code with :func:`ffn_backend` (read at trace
time: a function already compiled under one backend keeps it).

Shapes: ``R`` rows, ``d`` model size, ``f`` expert FFN size, ``G`` groups.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_edge.core.errors import MoeEdgeError

BACKENDS = ("auto", "mosaic", "lax")
MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("moe_edge_ffn_backend",
                                                                      default=None)


class KernelError(MoeEdgeError):
  """The grouped FFN's inputs are malformed, or the requested backend cannot run here."""


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Block sizes of tokamax's sm90 ragged_dot (``PallasMosaicRaggedDotConfig`` fields).

  ``block_m`` rows, ``block_n`` output columns, ``block_k`` contraction per pipeline step,
  ``num_stages`` pipeline depth, ``persistent`` one program per SM looping over tiles,
  ``grid_minor_dim`` 0 = M / 1 = N fastest, ``grid_tile_width`` tiles along it.
  """
  block_m: int = 64
  block_n: int = 64
  block_k: int = 128
  num_stages: int = 2
  persistent: bool = False
  grid_minor_dim: int = 0
  grid_tile_width: int = 1


#: Prefill-sized calls (more than DECODE_MAX_ROWS rows): 128-row blocks, 4 pipeline stages, one
#: program per SM looping over the tiles, N fastest. On an H200 (results/bench_ffn) it reached
#: 0.46 / 0.65 of the measured bf16 matmul rate on OLMoE (G=16) / Mixtral (G=8) prefill against
#: 0.38 / 0.40 with tokamax's heuristic, and the same block size for every G keeps the time
#: independent of the slots held. It loses where groups are far smaller than 128 rows (OLMoE,
#: 4096 rows over 64 used groups: 0.32 ms against 0.26). Decode-sized calls use tokamax's
#: heuristic (64 x 64 blocks, not persistent): the best measured there, and G-independent.
PREFILL_CONFIG = MosaicConfig(block_m=128, block_k=128, num_stages=4, persistent=True,
                              grid_minor_dim=1, grid_tile_width=4)
DECODE_MAX_ROWS = 256
#: ``config=TOKAMAX_HEURISTIC``: tokamax's own block-size heuristic (non-persistent, 64 x 64).
TOKAMAX_HEURISTIC = "tokamax"


def mosaic_config(rows: int, groups: int) -> MosaicConfig | None:
  """The Mosaic block configuration for a call of ``rows`` rows (None: tokamax's heuristic).

  Depends on the static row count only, never on ``groups`` (the slots held), so the same
  kernel runs whatever the placement's slot count is.
  """
  del groups
  return PREFILL_CONFIG if rows > DECODE_MAX_ROWS else None


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ffn_backend(name: str) -> Iterator[None]:
  """Within the block, grouped FFNs traced without ``backend=`` use ``name``."""
  _check_name(name)
  token = _OVERRIDE.set(name)
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


def _check_name(name: str) -> None:
  if name not in BACKENDS:
    raise KernelError(f"unknown grouped-FFN backend {name!r}; choose one of {BACKENDS}.")


@functools.lru_cache(maxsize=None)
def _tokamax():
  """The tokamax module, or the reason it cannot be used (a string)."""
  if sys.version_info < (3, 12):
    return "tokamax needs Python >= 3.12"
  try:
    return importlib.import_module("tokamax")
  except ImportError as e:  # optional dependency: pip install -e '.[gpu]'
    return f"tokamax does not import ({e}); install it with pip install -e '.[gpu]'"


def _target_device() -> jax.Device:
  """The device code traced now runs on: ``jax.default_device``'s, else the default backend's."""
  dev = jax.config.jax_default_device
  if dev is None:
    return jax.devices()[0]
  return jax.devices(dev)[0] if isinstance(dev, str) else dev


def tokamax_version() -> str | None:
  """tokamax's version when it imports here, else None."""
  mod = _tokamax()
  return None if isinstance(mod, str) else str(getattr(mod, "__version__", "?"))


def mosaic_unavailable(dtype) -> str | None:
  """Why the Mosaic backend cannot run ``dtype`` inputs on the target device (None: it can)."""
  device = _target_device()
  if device.platform != "gpu":
    return f"the default device is {device.platform}, not a GPU"
  cc = str(getattr(device, "compute_capability", ""))
  if not cc.startswith("9."):
    return f"the GPU ({device.device_kind}, compute capability {cc or '?'}) is not a Hopper GPU"
  if jnp.dtype(dtype) not in [jnp.dtype(t) for t in MOSAIC_DTYPES]:
    return f"its kernel takes bfloat16/float16 inputs, got {jnp.dtype(dtype).name}"
  mod = _tokamax()
  return mod if isinstance(mod, str) else None


def select_backend(dtype, backend: str | None = None) -> str:
  """The backend (``"mosaic"`` or ``"lax"``) a grouped FFN on ``dtype`` inputs uses here.

  ``backend`` (or the enclosing :func:`ffn_backend`, else ``"auto"``). An explicit
  ``"mosaic"`` that cannot run raises :class:`KernelError` saying why.
  """
  name = backend if backend is not None else (_OVERRIDE.get() or "auto")
  _check_name(name)
  if name == "lax":
    return "lax"
  why = mosaic_unavailable(dtype)
  if name == "mosaic" and why is not None:
    raise KernelError(f"grouped-FFN backend 'mosaic' cannot run: {why}. Use backend='lax' "
                      f"or 'auto'.")
  return "mosaic" if why is None else "lax"


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def fuse_gate_up(w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
  """``[..., d, f]`` gate and up weights -> ``[..., d, 2f]`` (gate first). Works on numpy and
  JAX arrays; do it once when weights are loaded, not per call."""
  if w_gate.shape != w_up.shape:
    raise KernelError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} differ; "
                      f"both must be [..., d, f].")
  xp = jnp if isinstance(w_gate, jax.Array) else np
  return xp.concatenate([w_gate, w_up], axis=-1)


def split_gate_up(w_gate_up):
  """Inverse of :func:`fuse_gate_up`: ``[..., d, 2f]`` -> ``(w_gate, w_up)`` ``[..., d, f]``."""
  two_f = w_gate_up.shape[-1]
  if two_f % 2:
    raise KernelError(f"fused gate/up weights need an even last axis (2f), got {two_f}.")
  return w_gate_up[..., :two_f // 2], w_gate_up[..., two_f // 2:]


def _check_inputs(x, group_sizes, w_in, w_down) -> tuple[int, bool]:
  """Static shape checks; returns ``(f, fused)``."""
  if x.ndim != 2:
    raise KernelError(f"x must be [R, d] rows, got shape {tuple(x.shape)}.")
  d = x.shape[1]
  fused = not isinstance(w_in, (tuple, list))
  ins = (w_in,) if fused else tuple(w_in)
  if not fused and (len(ins) != 2 or ins[0].shape != ins[1].shape):
    raise KernelError(f"w_in must be fused [G, d, 2f] or a pair (w_gate, w_up) of equal "
                      f"[G, d, f], got {[tuple(w.shape) for w in ins]}.")
  w = ins[0]
  if w.ndim != 3 or w.shape[1] != d:
    raise KernelError(f"gate/up weights must be [G, d={d}, ...], got {tuple(w.shape)}.")
  g = w.shape[0]
  f = w.shape[2] // 2 if fused else w.shape[2]
  if fused and w.shape[2] % 2:
    raise KernelError(f"fused gate/up weights need an even last axis (2f), got {w.shape[2]}.")
  if w_down.shape != (g, f, d):
    raise KernelError(f"w_down must be [G, f, d] = {[g, f, d]}, got {tuple(w_down.shape)}.")
  if group_sizes.shape != (g,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise KernelError(f"group_sizes must be [G={g}] integers, got {tuple(group_sizes.shape)} "
                      f"{group_sizes.dtype}.")
  return f, fused


# --------------------------------------------------------------------------------------------
# The FFN
# --------------------------------------------------------------------------------------------
def _lax_dot(x, w, group_sizes, config):
  del config
  return jax.lax.ragged_dot(x, w, group_sizes)


def _mosaic_dot(x, w, group_sizes, config: MosaicConfig | str):
  tk = _tokamax()
  impl = "mosaic"
  if config != TOKAMAX_HEURISTIC:
    # tokamax.ops.gpu re-exports these but also imports its Triton ops (jax_triton); the module
    # itself needs only what the Mosaic kernel needs. Pinned: tokamax==0.0.17.
    mgpu = importlib.import_module("tokamax._src.ops.ragged_dot.pallas_mosaic_gpu")
    impl = [mgpu.PallasMosaicGpuRaggedDot(config=mgpu.Config(split_k=1,
                                                             **dataclasses.asdict(config)))]
  return tk.ragged_dot(x, w, group_sizes, implementation=impl)


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, w_in, w_down: jax.Array, *,
                backend: str | None = None,
                config: MosaicConfig | str | None = None) -> jax.Array:
  """SwiGLU of every row through its group's expert, computing only rows that belong to a group.

  Args:
    x: ``[R, d]`` rows sorted by group.
    group_sizes: ``[G]`` int rows per group (``sum <= R``; empty groups allowed).
    w_in: fused ``w_gate_up [G, d, 2f]`` (one matmul) or a pair ``(w_gate, w_up)`` of
      ``[G, d, f]``; cast to ``x.dtype``.
    w_down: ``[G, f, d]``; cast to ``x.dtype``.
    backend: ``"auto"``, ``"mosaic"`` or ``"lax"`` (default: :func:`ffn_backend`'s, else auto).
    config: Mosaic block sizes (default: :func:`mosaic_config` of the static ``R`` and ``G``;
      :data:`TOKAMAX_HEURISTIC` for tokamax's own); ignored by ``"lax"``.

  Returns:
    ``[R, d]`` in ``x.dtype``; rows ``>= sum(group_sizes)`` are zero.
  """
  f, fused = _check_inputs(x, group_sizes, w_in, w_down)
  dt = x.dtype
  if config is None:
    config = mosaic_config(x.shape[0], w_down.shape[0]) or TOKAMAX_HEURISTIC
  dot = functools.partial(_mosaic_dot if select_backend(dt, backend) == "mosaic" else _lax_dot,
                          group_sizes=group_sizes.astype(jnp.int32), config=config)
  if fused:
    gu = dot(x, w_in.astype(dt))
    gate, up = gu[:, :f], gu[:, f:]
  else:
    gate, up = (dot(x, w.astype(dt)) for w in w_in)
  y = dot(jax.nn.silu(gate) * up, w_down.astype(dt))
  real = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(real[:, None], y, jnp.zeros((), dt))


def sort_by_group(keys: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """Order and sizes for :func:`grouped_ffn` from per-row group ids.

  ``keys [R]`` int group of each row, ``>= num_groups`` (or negative) for rows to skip.
  Returns ``(order [R] int32, group_sizes [num_groups] int32)``: ``rows[order]`` lists the rows
  of group 0, then group 1, ..., then the skipped rows (stable within a group).
  """
  key = jnp.where((keys >= 0) & (keys < num_groups), keys, num_groups)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  sizes = jnp.zeros((num_groups,), jnp.int32).at[key].add(1, mode="drop")
  return order, sizes


__all__: Sequence[str] = ("BACKENDS", "KernelError", "MosaicConfig", "TOKAMAX_HEURISTIC",
                          "ffn_backend", "fuse_gate_up", "grouped_ffn", "mosaic_config",
                          "mosaic_unavailable", "select_backend", "sort_by_group",
                          "split_gate_up", "tokamax_version")

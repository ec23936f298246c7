"""Calibration of the cost model's compute terms from measured kernel times.

The cost model (:mod:`moe_edge.cost.model`) prices an expert with a roofline built from each
server's datasheet peak FLOP/s and memory bandwidth. Real kernels reach only part of those peaks,
so every server carries two efficiency factors:

  effective FLOP/s        = peak_flops[n]    * flops_efficiency[n]
  effective bandwidth     = mem_bandwidth[n] * bw_efficiency[n]

They come from one of two places:

* ``"datasheet"``: the factors are given (default 1.0, the pure datasheet roofline).
* a measurement of the local JAX backend (:func:`measure_local`): a jitted SwiGLU expert FFN is
  timed at a few token counts ``c``, and :func:`fit_roofline` fits
  ``t(c) = max(W / BW_eff, c * F / P_eff)`` (``W`` expert weight bytes, ``F`` FLOPs per token) by
  its two asymptotes: ``BW_eff = max_c W / t(c)`` (best weight-streaming rate, reached at the
  smallest batch) and ``P_eff = max_c c F / t(c)`` (best FLOP rate, reached at the largest batch).
  The factors are ``BW_eff / mem_bandwidth`` and ``P_eff / peak_flops`` of the server the
  measurement stands for: its datasheet :class:`~moe_edge.config.ServerSpec` when the measured
  device is one of the cluster's servers, otherwise the device's own micro-benchmarks (a large
  matmul's FLOP/s and an elementwise copy's bytes/s, see :func:`local_server_spec`).

For the edge cluster, servers that were not measured keep datasheet numbers with the given
default factors; a server that was measured takes its factors from that measurement
(:func:`calibrate_local`, :meth:`Calibration.with_measurement`). Calibrations are saved as JSON.

Only numpy is imported at module level; JAX is imported when a measurement runs. From the
command line (prints the kernel times and the fitted factors, optionally saves the JSON)::

  python moe_edge/cost/calibrate.py --d_model 2048 --d_ff 1024 --out calibration.json
  python moe_edge/cost/calibrate.py --cluster edge_hetero_4 --server_index 0 --out cal.json

On a CPU, experts small enough for the caches can beat the copy benchmark (bandwidth factor
above 1); on a GPU the factors are below 1 (kernel launch and small-batch matmul efficiency).
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from moe_edge.config import ClusterConfig, ServerSpec, cluster_config, uniform_links
from moe_edge.core import files
from moe_edge.core.errors import MoeEdgeError
from moe_edge.io import atomic, check_output_file, cli


class CalibrationError(MoeEdgeError):
  """A calibration is malformed or does not match the cluster it is used with."""


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelMeasurement:
  """Kernel times of one device, and the rates fitted from them.

  Attributes:
    device_kind: ``jax.devices()[0].device_kind`` of the measured device.
    platform: ``cpu``, ``gpu`` or ``tpu``.
    date: ISO date of the measurement.
    dtype: dtype of weights and activations in the timed kernels.
    matmul_flops: FLOP/s of a large square matmul (the device's practical compute peak).
    copy_bandwidth: bytes/s of an elementwise pass over a large array (read + write).
    d_model, d_ff: shape of the timed expert (weights ``3 * d_model * d_ff`` elements).
    token_counts: ``[C]`` tokens per timed expert call.
    ffn_seconds: ``[C]`` median seconds per expert at each token count (a jitted call runs
      ``experts_per_call[c]`` distinct experts as one batched matmul, as an MoE layer does, and
      its time is divided by that number; this amortises the host's per-call overhead and keeps
      the weights from being served by a cache).
    experts_per_call: ``[C]`` distinct experts per timed call.
  """
  device_kind: str
  platform: str
  date: str
  dtype: str
  matmul_flops: float
  copy_bandwidth: float
  d_model: int
  d_ff: int
  token_counts: tuple[int, ...]
  ffn_seconds: tuple[float, ...]
  experts_per_call: tuple[int, ...] = ()

  @property
  def expert_weight_bytes(self) -> int:
    # ml_dtypes registers bfloat16 with numpy (numpy alone does not know the name).
    import ml_dtypes  # noqa: F401, PLC0415  (a dependency of jax)
    return 3 * self.d_model * self.d_ff * np.dtype(self.dtype).itemsize

  @property
  def expert_flops_per_token(self) -> int:
    return 2 * 3 * self.d_model * self.d_ff

  def fitted(self) -> tuple[float, float]:
    """``(effective bandwidth bytes/s, effective FLOP/s)`` of the expert kernel."""
    return fit_roofline(self.token_counts, self.ffn_seconds, self.expert_weight_bytes,
                        self.expert_flops_per_token)

  def efficiency(self, server: ServerSpec | None = None) -> tuple[float, float]:
    """``(flops_efficiency, bw_efficiency)`` relative to ``server``'s datasheet, or to this
    device's own micro-benchmarks (:func:`local_server_spec`) when ``server`` is None."""
    ref = server if server is not None else local_server_spec(self)
    bw, flops = self.fitted()
    return flops / ref.peak_flops, bw / ref.mem_bandwidth

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for key in ("token_counts", "ffn_seconds", "experts_per_call"):
      d[key] = list(getattr(self, key))
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "KernelMeasurement":
    d = dict(d)
    d["token_counts"] = tuple(int(c) for c in d["token_counts"])
    d["ffn_seconds"] = tuple(float(s) for s in d["ffn_seconds"])
    d["experts_per_call"] = tuple(int(r) for r in d.get("experts_per_call", ()))
    return cls(**d)


def fit_roofline(token_counts: Sequence[int], seconds: Sequence[float], weight_bytes: float,
                 flops_per_token: float) -> tuple[float, float]:
  """Fit ``t(c) = max(W / BW_eff, c * F / P_eff)`` by its two asymptotes.

  ``BW_eff = max_c W / t(c)`` and ``P_eff = max_c c F / t(c)``: on data that reaches both the
  bandwidth-bound (small ``c``) and the FLOP-bound (large ``c``) regime this recovers both rates
  exactly; where only one regime was measured, the other rate is a lower bound (measure a wider
  range of token counts).

  Args:
    token_counts: ``[C]`` positive token counts.
    seconds: ``[C]`` positive measured times.
  Returns:
    ``(BW_eff bytes/s, P_eff FLOP/s)``.
  """
  c = np.asarray(token_counts, dtype=np.float64)
  t = np.asarray(seconds, dtype=np.float64)
  if c.ndim != 1 or c.shape != t.shape or c.size == 0:
    raise CalibrationError(f"token_counts {c.shape} and seconds {t.shape} must be equal-length "
                           f"non-empty vectors.")
  if np.any(~(c > 0)) or np.any(~(t > 0)) or not np.all(np.isfinite(t)):
    raise CalibrationError("token counts and measured times must be positive and finite.")
  return float(np.max(weight_bytes / t)), float(np.max(c * flops_per_token / t))


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of ``repeats`` calls of ``fn()`` (which must block until its result is
  ready), after one call that compiles and warms up."""
  fn()
  times = []
  for _ in range(max(int(repeats), 1)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure_local(d_model: int = 1024, d_ff: int = 512,
                  token_counts: Sequence[int] = (1, 8, 64, 512), dtype: str | None = None,
                  matmul_size: int | None = None, copy_bytes: int | None = None,
                  expert_bytes_per_call: int | None = None, repeats: int = 5,
                  seed: int = 0) -> KernelMeasurement:
  """Time a matmul, an elementwise copy and a jitted SwiGLU expert FFN on ``jax.devices()[0]``.

  Defaults are sized to take a few seconds: on CPU a 1024^2 matmul, a 64 MB copy and 32 MB of
  expert weights per FFN call in float32; on an accelerator an 8192^2 matmul, a 1 GB copy and
  512 MB of expert weights per call (several experts as one batched matmul, at most 64 experts
  and 65,536 tokens per call) in bfloat16.

  Args:
    d_model, d_ff: expert shape; weights are ``[d_model, d_ff]`` (gate, up) and
      ``[d_ff, d_model]`` (down).
    token_counts: tokens per expert call to time.
    dtype: ``"float32"`` or ``"bfloat16"`` (default by platform).
  """
  import jax
  import jax.numpy as jnp

  dev = jax.devices()[0]
  cpu = dev.platform == "cpu"
  dtype = dtype or ("float32" if cpu else "bfloat16")
  if dtype not in ("float32", "bfloat16", "float16"):
    raise CalibrationError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}.")
  if not token_counts or min(token_counts) <= 0:
    raise CalibrationError(f"token_counts must be positive, got {tuple(token_counts)}.")
  jdt = jnp.dtype(dtype)
  n = matmul_size or (1024 if cpu else 8192)
  nbytes = copy_bytes or ((64 if cpu else 1024) * 2**20)
  keys = jax.random.split(jax.random.key(seed), 6)

  a = jax.random.normal(keys[0], (n, n), jdt)
  b = jax.random.normal(keys[1], (n, n), jdt)
  mm = jax.jit(lambda x, y: jnp.einsum("ij,jk->ik", x, y))
  matmul_flops = 2.0 * n**3 / _median_seconds(lambda: mm(a, b).block_until_ready(), repeats)

  v = jnp.ones((nbytes // jdt.itemsize,), jdt)
  inc = jax.jit(lambda x: x + jnp.asarray(1, jdt))
  copy_bw = 2.0 * v.size * jdt.itemsize / _median_seconds(
      lambda: inc(v).block_until_ready(), repeats)

  scale = 1.0 / np.sqrt(d_model)
  per_call = expert_bytes_per_call or ((32 if cpu else 512) * 2**20)
  max_experts = int(np.clip(per_call // (3 * d_model * d_ff * jdt.itemsize), 1, 64))

  @jax.jit
  def ffn(x, wg, wu, wd):  # R experts, each on its own [c, d] tokens: [R, c, d] -> [R, c, d]
    h = jax.nn.silu(jnp.einsum("rtd,rdf->rtf", x, wg)) * jnp.einsum("rtd,rdf->rtf", x, wu)
    return jnp.einsum("rtf,rfd->rtd", h, wd)

  seconds, experts = [], []
  for c in token_counts:
    r = int(max(1, min(max_experts, 65536 // int(c))))
    wg = jax.random.normal(keys[2], (r, d_model, d_ff), jdt) * scale
    wu = jax.random.normal(keys[3], (r, d_model, d_ff), jdt) * scale
    wd = jax.random.normal(keys[4], (r, d_ff, d_model), jdt) * scale
    x = jax.random.normal(keys[5], (r, int(c), d_model), jdt)
    t = _median_seconds(lambda: ffn(x, wg, wu, wd).block_until_ready(), repeats)
    seconds.append(t / r)
    experts.append(r)
    del wg, wu, wd, x
  return KernelMeasurement(
      device_kind=str(dev.device_kind), platform=str(dev.platform),
      date=datetime.date.today().isoformat(), dtype=dtype, matmul_flops=float(matmul_flops),
      copy_bandwidth=float(copy_bw), d_model=int(d_model), d_ff=int(d_ff),
      token_counts=tuple(int(c) for c in token_counts), ffn_seconds=tuple(seconds),
      experts_per_call=tuple(experts))


def local_server_spec(measurement: KernelMeasurement, memory_bytes: float = 16e9,
                      name: str | None = None) -> ServerSpec:
  """A :class:`ServerSpec` for the measured device: its micro-benchmark rates as "datasheet"."""
  return ServerSpec(name or measurement.device_kind, memory_bytes=float(memory_bytes),
                    peak_flops=measurement.matmul_flops,
                    mem_bandwidth=measurement.copy_bandwidth)


def local_cluster(measurement: KernelMeasurement, num_servers: int,
                  link_bandwidth: float | None = None, link_latency: float = 0.0,
                  memory_bytes: float = 16e9) -> ClusterConfig:
  """``num_servers`` copies of the measured device (e.g. the host CPU devices the tests use),
  fully connected by links of ``link_bandwidth`` bytes/s (default: the measured copy bandwidth)
  and ``link_latency`` seconds; for comparing the cost model with real execution here."""
  spec = local_server_spec(measurement, memory_bytes)
  bw, lat = uniform_links(num_servers, link_bandwidth or measurement.copy_bandwidth,
                          link_latency)
  return ClusterConfig(name=f"local_{measurement.platform}_{num_servers}",
                       servers=(spec,) * num_servers, bandwidth=bw, latency=lat,
                       source=f"measured on {measurement.device_kind} at {measurement.date}")


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Calibration:
  """Per-server efficiency factors of the roofline (see the module docstring).

  Attributes:
    flops_efficiency: ``[N]`` float64, achieved / datasheet FLOP/s.
    bw_efficiency: ``[N]`` float64, achieved / datasheet memory bandwidth.
    source: ``"datasheet"`` or ``"measured on <device kind> at <date>"`` (plus which server).
    servers: names of the servers the factors belong to (checked against the cluster if set).
    measurements: server index -> :class:`KernelMeasurement` behind its factors.
  """
  flops_efficiency: np.ndarray
  bw_efficiency: np.ndarray
  source: str = "datasheet"
  servers: tuple[str, ...] = ()
  measurements: dict[int, KernelMeasurement] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    fe = np.asarray(self.flops_efficiency, dtype=np.float64)
    be = np.asarray(self.bw_efficiency, dtype=np.float64)
    object.__setattr__(self, "flops_efficiency", fe)
    object.__setattr__(self, "bw_efficiency", be)
    if fe.ndim != 1 or fe.shape != be.shape:
      raise CalibrationError(f"flops_efficiency {fe.shape} and bw_efficiency {be.shape} must be "
                             f"[N] vectors of the same length.")
    for name, a in (("flops_efficiency", fe), ("bw_efficiency", be)):
      if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise CalibrationError(f"{name} must be finite and > 0 (a fraction of the datasheet "
                               f"peak), got {a.tolist()}.")
    if self.servers and len(self.servers) != fe.size:
      raise CalibrationError(f"{len(self.servers)} server names for {fe.size} factors.")

  @property
  def num_servers(self) -> int:
    return int(self.flops_efficiency.size)

  @classmethod
  def datasheet(cls, cluster: ClusterConfig, flops_efficiency: float = 1.0,
                bw_efficiency: float = 1.0) -> "Calibration":
    """The same factors for every server of ``cluster`` (1.0: the plain datasheet roofline)."""
    n = cluster.num_servers
    return cls(np.full(n, float(flops_efficiency)), np.full(n, float(bw_efficiency)),
               "datasheet", tuple(s.name for s in cluster.servers))

  def check(self, cluster: ClusterConfig) -> None:
    """Raise CalibrationError unless these factors belong to ``cluster``'s servers."""
    if self.num_servers != cluster.num_servers:
      raise CalibrationError(f"calibration has factors for {self.num_servers} servers but "
                             f"cluster {cluster.name!r} has {cluster.num_servers}; calibrate "
                             f"for this cluster (Calibration.datasheet(cluster)).")
    names = tuple(s.name for s in cluster.servers)
    if self.servers and self.servers != names:
      raise CalibrationError(f"calibration is for servers {list(self.servers)} but cluster "
                             f"{cluster.name!r} has {list(names)}.")

  def with_measurement(self, index: int, measurement: KernelMeasurement,
                       server: ServerSpec | None = None) -> "Calibration":
    """Copy whose server ``index`` takes its factors from ``measurement`` (relative to
    ``server``'s datasheet; to the measured micro-benchmarks if None)."""
    if not 0 <= index < self.num_servers:
      raise CalibrationError(f"server index {index} outside [0, {self.num_servers}).")
    fe, be = self.flops_efficiency.copy(), self.bw_efficiency.copy()
    fe[index], be[index] = measurement.efficiency(server)
    what = f"measured on {measurement.device_kind} at {measurement.date}"
    label = self.servers[index] if self.servers else f"server {index}"
    others = [i for i in range(self.num_servers) if i != index and i not in self.measurements]
    source = what if not others else f"{what} ({label}); {self.source} for the rest"
    return dataclasses.replace(self, flops_efficiency=fe, bw_efficiency=be, source=source,
                               measurements={**self.measurements, index: measurement})

  # ---- I/O ---------------------------------------------------------------------------------
  def to_dict(self) -> dict:
    return dict(flops_efficiency=self.flops_efficiency.tolist(),
                bw_efficiency=self.bw_efficiency.tolist(), source=self.source,
                servers=list(self.servers),
                measurements={str(k): m.to_dict() for k, m in self.measurements.items()})

  @classmethod
  def from_dict(cls, d: dict) -> "Calibration":
    try:
      return cls(np.asarray(d["flops_efficiency"], dtype=np.float64),
                 np.asarray(d["bw_efficiency"], dtype=np.float64), str(d.get("source", "")),
                 tuple(d.get("servers", ())),
                 {int(k): KernelMeasurement.from_dict(m)
                  for k, m in d.get("measurements", {}).items()})
    except KeyError as e:
      raise CalibrationError(f"calibration JSON lacks the key {e}.") from None
    except CalibrationError:
      raise
    except (TypeError, ValueError, AttributeError) as e:
      raise CalibrationError(f"calibration JSON has a malformed entry "
                             f"({type(e).__name__}: {' '.join(str(e).split())}).") from None

  def save(self, path: str | Path) -> Path:
    """Write the JSON atomically."""
    return atomic.write_json(path, self.to_dict(), indent=1)

  @classmethod
  def load(cls, path: str | Path) -> "Calibration":
    """Read a calibration JSON; a damaged or malformed file raises one CalibrationError naming
    it."""
    fix = "write one with calibrate_local(...).save(path)"
    d = files.read_json(path, CalibrationError, "calibration", fix,
                        required=("flops_efficiency", "bw_efficiency"))
    try:
      return cls.from_dict(d)
    except CalibrationError as e:
      raise CalibrationError(f"{path}: {e}") from None

  def __eq__(self, other):
    return (isinstance(other, Calibration)
            and np.array_equal(self.flops_efficiency, other.flops_efficiency)
            and np.array_equal(self.bw_efficiency, other.bw_efficiency)
            and self.source == other.source and self.servers == other.servers
            and self.measurements == other.measurements)


def calibrate_local(cluster: ClusterConfig | None = None, server_index: int = 0,
                    measurement: KernelMeasurement | None = None,
                    default_flops_efficiency: float = 1.0, default_bw_efficiency: float = 1.0,
                    **measure_kwargs) -> Calibration:
  """Measure the local JAX backend (unless ``measurement`` is given) and calibrate.

  * ``cluster`` None: a one-server calibration of this device relative to its own
    micro-benchmarks; use it with :func:`local_cluster` built from the same measurement.
  * ``cluster`` given: the local device is taken to be server ``server_index`` of the cluster;
    its factors are measured relative to that server's datasheet, the other servers keep
    the default (datasheet) factors.

  ``measure_kwargs`` go to :func:`measure_local` (shape, token counts, dtype, repeats).
  """
  m = measurement or measure_local(**measure_kwargs)
  if cluster is None:
    spec = local_server_spec(m)
    base = Calibration(np.ones(1), np.ones(1), "datasheet", (spec.name,))
    return base.with_measurement(0, m, spec)
  if not 0 <= server_index < cluster.num_servers:
    raise CalibrationError(f"server_index {server_index} outside [0, {cluster.num_servers}) of "
                           f"cluster {cluster.name!r}.")
  base = Calibration.datasheet(cluster, default_flops_efficiency, default_bw_efficiency)
  return base.with_measurement(server_index, m, cluster.servers[server_index])


def predicted_vs_measured(measured_step_s: float | Sequence[float], report) -> float:
  """``measured / predicted`` mean step time (1.0: the cost model is exact; 2.0: reality is
  twice as slow as predicted).

  Args:
    measured_step_s: a measured mean step time in seconds, or ``[S]`` measured times of the
      report's steps (in step order).
    report: a :class:`~moe_edge.cost.model.CostReport`.
  """
  measured = np.asarray(measured_step_s, dtype=np.float64)
  predicted = np.asarray(report.step_latency, dtype=np.float64)
  if measured.ndim > 1 or (measured.ndim == 1 and measured.shape != predicted.shape):
    raise CalibrationError(f"measured times have shape {measured.shape}; pass one mean time or "
                           f"one time per step of the report ({predicted.shape[0]} steps).")
  if measured.size == 0 or not np.all(measured > 0) or not np.all(np.isfinite(measured)):
    raise CalibrationError("measured step times must be positive and finite.")
  pred = float(predicted.mean())
  if not pred > 0:
    raise CalibrationError("the report predicts zero time; nothing to compare against.")
  return float(measured.mean()) / pred


def _main(argv):
  """``python -m moe_edge.cost.calibrate``: measure this machine, print and optionally save."""
  from absl import app, flags  # noqa: PLC0415  (only the command line needs absl)
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.check_flags(f, at_least_1=("d_model", "d_ff", "repeats"), at_least_0=("server_index",))
  try:
    counts = tuple(int(c) for c in f.token_counts)
  except ValueError:
    raise app.UsageError(f"--token_counts={','.join(f.token_counts)} must be integers.") from None
  if f.out:
    check_output_file(f.out, overwrite=True, suffix=".json")  # before measuring
  m = measure_local(f.d_model, f.d_ff, counts, f.dtype,
                    repeats=f.repeats)
  bw, flops = m.fitted()
  print(f"device {m.device_kind} ({m.platform}), {m.date}, {m.dtype}")
  print(f"matmul {m.matmul_flops / 1e12:.2f} TFLOP/s, copy {m.copy_bandwidth / 1e9:.1f} GB/s")
  print(f"expert FFN d={m.d_model} f={m.d_ff} ({m.expert_weight_bytes / 1e6:.2f} MB):")
  for c, s in zip(m.token_counts, m.ffn_seconds):
    print(f"  {c:6d} tokens  {1e6 * s:10.1f} us/expert  "
          f"{c * m.expert_flops_per_token / s / 1e12:8.3f} TFLOP/s  "
          f"{m.expert_weight_bytes / s / 1e9:9.1f} GB/s of weights")
  print(f"fitted roofline: {bw / 1e9:.1f} GB/s, {flops / 1e12:.2f} TFLOP/s")
  if f.cluster:
    cal = calibrate_local(cluster_config(f.cluster), f.server_index, measurement=m)
  else:
    cal = calibrate_local(measurement=m)
  print(f"efficiency: flops {cal.flops_efficiency.round(3).tolist()}, "
        f"bandwidth {cal.bw_efficiency.round(3).tolist()} ({cal.source})")
  if f.out:
    print(f"saved {cal.save(f.out)}")


if __name__ == "__main__":
  from absl import flags
  flags.DEFINE_integer("d_model", 2048, "Expert hidden size (default: OLMoE-1B-7B).")
  flags.DEFINE_integer("d_ff", 1024, "Expert FFN size.")
  flags.DEFINE_list("token_counts", ["1", "8", "64", "512", "4096"], "Tokens per expert call.")
  flags.DEFINE_string("dtype", None, "float32 / bfloat16 (default by platform).")
  flags.DEFINE_integer("repeats", 10, "Timed calls per kernel (median).")
  flags.DEFINE_string("cluster", None, "Cluster whose server --server_index this device is.")
  flags.DEFINE_integer("server_index", 0, "Index of this device in --cluster.")
  flags.DEFINE_string("out", None, "Write the calibration JSON here.")
  cli.run(_main)

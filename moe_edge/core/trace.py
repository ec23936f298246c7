"""ActivationTrace: which experts each token picked, in every MoE layer, on which server.

The on-disk format is an ``.npz`` (docs/DESIGN.md, "Data formats"):

  expert_ids   [T, L, k] int32    expert chosen by token t at MoE layer l, rank r (best first)
  gate_weights [T, L, k] float32  the gate weight the model gave that choice
  server       [T] int32          which server's request stream token t came from
  request      [T] int32          request (sequence) id, unique across servers
  position     [T] int32          position of the token inside its request
  step         [T] int32          time order (decode step / batch index), for drift
  metadata: model (config name), source (corpus or statistics file), top_k, num_experts,
            num_servers, note (free text)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from moe_edge.core.errors import MoeEdgeError


class TraceError(MoeEdgeError):
  """A trace is malformed or does not match the model / cluster it is used with."""


@dataclasses.dataclass(frozen=True)
class ActivationTrace:
  """Per-token routing decisions of an MoE model. Shapes in the module docstring."""
  expert_ids: np.ndarray
  gate_weights: np.ndarray
  server: np.ndarray
  request: np.ndarray
  position: np.ndarray
  step: np.ndarray
  model: str
  num_experts: int
  num_servers: int
  source: str = ""
  note: str = ""

  def __post_init__(self):
    self.validate()

  # ---- shape helpers -----------------------------------------------------------------------
  @property
  def num_tokens(self) -> int:
    return int(self.expert_ids.shape[0])

  @property
  def num_layers(self) -> int:
    return int(self.expert_ids.shape[1])

  @property
  def top_k(self) -> int:
    return int(self.expert_ids.shape[2])

  # ---- validation --------------------------------------------------------------------------
  def validate(self) -> None:
    """Check shapes, dtypes and ranges; raise TraceError naming the problem and the fix."""
    ids, g = np.asarray(self.expert_ids), np.asarray(self.gate_weights)
    if ids.ndim != 3:
      raise TraceError(f"expert_ids must be [T, L, k], got shape {ids.shape}.")
    if g.shape != ids.shape:
      raise TraceError(f"gate_weights shape {g.shape} differs from expert_ids shape "
                       f"{ids.shape}; both must be [T, L, k].")
    if not np.issubdtype(ids.dtype, np.integer):
      raise TraceError(f"expert_ids must be integers, got {ids.dtype}.")
    t = ids.shape[0]
    for key in ("server", "request", "position", "step"):
      a = np.asarray(getattr(self, key))
      if a.shape != (t,):
        raise TraceError(f"{key} must be [T] = [{t}], got shape {a.shape}.")
      if not np.issubdtype(a.dtype, np.integer):
        raise TraceError(f"{key} must be integers, got {a.dtype}.")
    if self.num_experts <= 0 or self.num_servers <= 0:
      raise TraceError("num_experts and num_servers must be positive.")
    if t and (ids.min() < 0 or ids.max() >= self.num_experts):
      bad = np.argwhere((ids < 0) | (ids >= self.num_experts))[0]
      raise TraceError(f"expert id {int(ids[tuple(bad)])} at (token, layer, rank) = "
                       f"{tuple(int(b) for b in bad)} is outside [0, {self.num_experts}); was "
                       f"the trace recorded with another model?")
    if ids.shape[2] > 1 and t:
      srt = np.sort(ids, axis=-1)
      dup = np.any(srt[..., 1:] == srt[..., :-1], axis=-1)
      if dup.any():
        tok, lay = np.argwhere(dup)[0]
        raise TraceError(f"token {tok} picks the same expert twice at layer {lay}: "
                         f"{ids[tok, lay].tolist()}; top-k choices must be distinct.")
    if not np.all(np.isfinite(g)):
      bad = np.argwhere(~np.isfinite(g))[0]
      raise TraceError(f"gate weight at (token, layer, rank) = {tuple(int(b) for b in bad)} is "
                       f"{g[tuple(bad)]}; NaN/inf gates usually mean the router overflowed. "
                       f"Re-record the trace in float32.")
    if np.any(g < 0):
      bad = np.argwhere(g < 0)[0]
      raise TraceError(f"negative gate weight {g[tuple(bad)]} at (token, layer, rank) = "
                       f"{tuple(int(b) for b in bad)}; gates are softmax probabilities.")
    srv = np.asarray(self.server)
    if t and (srv.min() < 0 or srv.max() >= self.num_servers):
      raise TraceError(f"server ids must lie in [0, {self.num_servers}), got range "
                       f"[{srv.min()}, {srv.max()}].")

  def check_matches(self, num_layers: int, num_experts: int, top_k: int | None = None,
                    num_servers: int | None = None, what: str = "model") -> None:
    """Raise TraceError unless this trace fits a model with these shapes (and a cluster)."""
    if self.num_layers != num_layers:
      raise TraceError(f"trace has {self.num_layers} MoE layers but the {what} has "
                       f"{num_layers}; record the trace with the same model config "
                       f"(trace model: {self.model!r}).")
    if self.num_experts != num_experts:
      raise TraceError(f"trace routes over {self.num_experts} experts but the {what} has "
                       f"{num_experts} (trace model: {self.model!r}).")
    if top_k is not None and self.top_k != top_k:
      raise TraceError(f"trace has top_k={self.top_k} but the {what} uses top_k={top_k}.")
    if num_servers is not None and self.num_servers != num_servers:
      raise TraceError(f"trace was recorded for {self.num_servers} servers but the cluster has "
                       f"{num_servers}; build the request streams for this cluster.")

  # ---- statistics --------------------------------------------------------------------------
  def counts(self) -> np.ndarray:
    """``[N, L, E]`` int64: token-choices of each expert per server and layer."""
    n, l, e = self.num_servers, self.num_layers, self.num_experts
    flat = (self.server[:, None, None] * l + np.arange(l)[None, :, None]) * e + self.expert_ids
    return np.bincount(flat.ravel(), minlength=n * l * e).reshape(n, l, e)

  def tokens_per_server(self) -> np.ndarray:
    """``[N]`` int64: tokens in each server's stream."""
    return np.bincount(self.server, minlength=self.num_servers)

  def frequency(self) -> np.ndarray:
    """``F [N, L, E]`` float64: token-choices per token of each server (rows sum to top_k)."""
    tok = np.maximum(self.tokens_per_server(), 1).astype(np.float64)
    return self.counts() / tok[:, None, None]

  # ---- slicing -----------------------------------------------------------------------------
  def select(self, mask: np.ndarray) -> "ActivationTrace":
    """The tokens where ``mask [T]`` is true, metadata kept."""
    mask = np.asarray(mask)
    return dataclasses.replace(
        self, expert_ids=self.expert_ids[mask], gate_weights=self.gate_weights[mask],
        server=self.server[mask], request=self.request[mask], position=self.position[mask],
        step=self.step[mask])

  def window(self, start: int, stop: int) -> "ActivationTrace":
    """Tokens with ``start <= step < stop``."""
    return self.select((self.step >= start) & (self.step < stop))

  # ---- I/O ---------------------------------------------------------------------------------
  def save(self, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(model=self.model, num_experts=self.num_experts, num_servers=self.num_servers,
                top_k=self.top_k, source=self.source, note=self.note)
    with open(path, "wb") as f:
      np.savez_compressed(
          f, expert_ids=self.expert_ids.astype(np.int32),
          gate_weights=self.gate_weights.astype(np.float32), server=self.server.astype(np.int32),
          request=self.request.astype(np.int32), position=self.position.astype(np.int32),
          step=self.step.astype(np.int32), metadata=np.array(json.dumps(meta)))
    return path

  @classmethod
  def load(cls, path: str | Path) -> "ActivationTrace":
    """Load and validate a trace; missing keys or bad metadata raise TraceError."""
    path = Path(path)
    if not path.is_file():
      raise TraceError(f"no trace file at {path}; make one with experiments/collect_traces.py.")
    with np.load(path, allow_pickle=False) as z:
      need = ("expert_ids", "gate_weights", "server", "request", "position", "step", "metadata")
      missing = [k for k in need if k not in z.files]
      if missing:
        raise TraceError(f"{path} is not an ActivationTrace: missing arrays {missing}.")
      meta = json.loads(str(z["metadata"]))
      arrays = {k: np.asarray(z[k]) for k in need[:-1]}
    if meta.get("top_k") != arrays["expert_ids"].shape[-1]:
      raise TraceError(f"{path}: metadata says top_k={meta.get('top_k')} but expert_ids has "
                       f"k={arrays['expert_ids'].shape[-1]}.")
    return cls(**arrays, model=meta["model"], num_experts=int(meta["num_experts"]),
               num_servers=int(meta["num_servers"]), source=meta.get("source", ""),
               note=meta.get("note", ""))


def concatenate(traces: list[ActivationTrace]) -> ActivationTrace:
  """Join traces of the same model and cluster along the token axis."""
  if not traces:
    raise TraceError("concatenate needs at least one trace.")
  first = traces[0]
  for t in traces[1:]:
    t.check_matches(first.num_layers, first.num_experts, first.top_k, first.num_servers,
                    what="first trace")
  cat = lambda k: np.concatenate([getattr(t, k) for t in traces])
  return dataclasses.replace(first, expert_ids=cat("expert_ids"), gate_weights=cat("gate_weights"),
                             server=cat("server"), request=cat("request"),
                             position=cat("position"), step=cat("step"))

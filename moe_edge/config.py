"""Typed configuration for models, clusters and placement.

Configs are plain frozen dataclasses. Named presets live as Python files under the repository's
``configs/`` folder (``configs/models/<name>.py`` and ``configs/clusters/<name>.py``), each defining
``get_config()``; :func:`model_config` and :func:`cluster_config` load them by name and say which
names exist when asked for one that does not.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_edge.core.errors import MoeEdgeError

GB = 1e9
GiB = 2**30


class ConfigError(MoeEdgeError):
  """A configuration is malformed or a named preset does not exist."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a decoder-only MoE transformer.

  Attributes:
    name: preset name.
    vocab_size: tokenizer vocabulary size.
    d_model: hidden size ``d``.
    n_layers: total decoder layers (dense + MoE).
    n_heads, n_kv_heads, head_dim: attention shape (grouped-query when n_kv_heads < n_heads).
    n_experts: routed experts per MoE layer ``E``.
    top_k: experts each token picks ``k``.
    d_ff_expert: routed expert FFN size ``f``.
    n_shared_experts: always-on shared experts per MoE layer (DeepSeek / Qwen style).
    d_ff_shared: FFN size of *each* shared expert.
    shared_expert_gate: Qwen-MoE multiplies the shared-expert output by sigmoid(x @ w).
    first_dense_layers: leading layers with a dense FFN instead of MoE (DeepSeek: 1).
    d_ff_dense: FFN size of those dense layers.
    norm_topk_prob: renormalise the top-k gate weights to sum to one (Mixtral: yes via
      softmax over the top-k logits; OLMoE, Qwen1.5-MoE, DeepSeek-V2-Lite: no).
    max_seq_len, rope_theta, norm_eps: the usual.
    tie_embeddings: share input embedding and output projection.
    kv_lora_rank, qk_rope_head_dim: multi-head latent attention (DeepSeek-V2): the KV cache holds
      one compressed latent of ``kv_lora_rank`` plus a decoupled RoPE key of ``qk_rope_head_dim``
      per token and layer instead of ``2 * n_kv_heads * head_dim`` (0 = ordinary attention).
      Only the attention cost and KV memory (``moe_edge/cost/attention.py``) read them.
    bytes_per_param: storage size of a parameter when *served* (2 for bf16, 0.5 for 4-bit);
      used by placement memory accounting, not by the Flax model's compute dtype.
    aux_loss_coef: weight of the load-balancing loss during training.
    source: where the numbers come from.
  """
  name: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  n_experts: int
  top_k: int
  d_ff_expert: int
  n_shared_experts: int = 0
  d_ff_shared: int = 0
  shared_expert_gate: bool = False
  first_dense_layers: int = 0
  d_ff_dense: int = 0
  norm_topk_prob: bool = True
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  kv_lora_rank: int = 0
  qk_rope_head_dim: int = 0
  bytes_per_param: float = 2
  aux_loss_coef: float = 0.01
  source: str = ""

  def __post_init__(self):
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "n_experts", "top_k", "d_ff_expert", "max_seq_len", "bytes_per_param")
    for f in positive:
      if getattr(self, f) <= 0:
        raise ConfigError(f"ModelConfig {self.name!r}: {f} must be positive, got "
                          f"{getattr(self, f)}.")
    if self.kv_lora_rank < 0 or self.qk_rope_head_dim < 0:
      raise ConfigError(f"ModelConfig {self.name!r}: kv_lora_rank and qk_rope_head_dim must be "
                        f">= 0 (0 = ordinary attention).")
    if self.top_k > self.n_experts:
      raise ConfigError(f"ModelConfig {self.name!r}: top_k={self.top_k} exceeds n_experts="
                        f"{self.n_experts}; a token cannot pick more experts than exist.")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"ModelConfig {self.name!r}: n_heads={self.n_heads} must be a multiple "
                        f"of n_kv_heads={self.n_kv_heads}.")
    if not 0 <= self.first_dense_layers < self.n_layers:
      raise ConfigError(f"ModelConfig {self.name!r}: first_dense_layers must be in "
                        f"[0, n_layers), got {self.first_dense_layers}.")
    if self.first_dense_layers and self.d_ff_dense <= 0:
      raise ConfigError(f"ModelConfig {self.name!r}: first_dense_layers > 0 needs d_ff_dense.")
    if self.n_shared_experts and self.d_ff_shared <= 0:
      raise ConfigError(f"ModelConfig {self.name!r}: n_shared_experts > 0 needs d_ff_shared.")

  # ---- derived sizes ----------------------------------------------------------------------
  @property
  def n_moe_layers(self) -> int:
    """``L``: number of MoE layers (what traces and placements index)."""
    return self.n_layers - self.first_dense_layers

  @property
  def expert_params(self) -> int:
    """Parameters of one routed expert: gate, up and down projections, ``3 d f``."""
    return 3 * self.d_model * self.d_ff_expert

  @property
  def expert_bytes(self) -> int:
    """Bytes of one routed expert when served."""
    return int(round(self.expert_params * self.bytes_per_param))

  @property
  def expert_flops_per_token(self) -> int:
    """FLOPs of one routed expert for one token (3 matmuls, 2 FLOPs per MAC)."""
    return 2 * self.expert_params

  @property
  def dense_params(self) -> int:
    """Parameters every server holds: embeddings, attention, norms, routers, shared experts,
    dense FFN layers and the output head."""
    d = self.d_model
    attn = d * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
    router = d * self.n_experts
    shared = self.n_shared_experts * 3 * d * self.d_ff_shared + (d if self.shared_expert_gate
                                                                 else 0)
    norms = 2 * d
    per_moe_layer = attn + router + shared + norms
    per_dense_layer = attn + 3 * d * self.d_ff_dense + norms
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return (self.n_moe_layers * per_moe_layer + self.first_dense_layers * per_dense_layer + emb
            + d)

  @property
  def dense_bytes(self) -> int:
    return int(round(self.dense_params * self.bytes_per_param))

  @property
  def dense_flops_per_token(self) -> int:
    """FLOPs per token outside the routed experts (matmuls only, attention scores excluded)."""
    return 2 * (self.dense_params - self.vocab_size * self.d_model *
                (0 if self.tie_embeddings else 1))

  @property
  def total_params(self) -> int:
    return self.dense_params + self.n_moe_layers * self.n_experts * self.expert_params

  @property
  def activation_bytes(self) -> int:
    """Bytes of one token's hidden state on the wire (what dispatch sends per expert choice)."""
    return int(self.d_model * 2)  # activations travel in bf16 whatever the weight format


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServerSpec:
  """One edge server.

  Attributes:
    name: e.g. "rtx4090".
    memory_bytes: accelerator memory available to the model (dense weights are subtracted
      later, per model, by :meth:`ClusterConfig.expert_memory`).
    peak_flops: dense bf16/fp16 FLOP/s the matmuls reach.
    mem_bandwidth: bytes/s of accelerator memory (decode reads every active weight once).
    reserved_bytes: memory kept for activations, KV cache and runtime.
    grouped_kernel: True (default) when the server runs a grouped expert FFN that costs per
      used expert (``moe_edge.kernels.grouped_ffn`` with tokamax, or any kernel of that kind);
      False for a deployment without one, whose expert FFN costs as XLA's
      ``jax.lax.ragged_dot`` measured on the H200 (results/bench_ffn): dense over the server's
      held slots, ``max(G W_e / mbw, rows G F_e / peak)`` per layer
      (:meth:`moe_edge.core.hardware.Hardware.compute_time`).
  """
  name: str
  memory_bytes: float
  peak_flops: float
  mem_bandwidth: float
  reserved_bytes: float = 0.0
  grouped_kernel: bool = True

  def __post_init__(self):
    for f in ("memory_bytes", "peak_flops", "mem_bandwidth"):
      if not getattr(self, f) > 0:
        raise ConfigError(f"Server {self.name!r}: {f} must be positive, got "
                          f"{getattr(self, f)}.")
    if self.reserved_bytes < 0:
      raise ConfigError(f"Server {self.name!r}: reserved_bytes must be >= 0.")
    if not isinstance(self.grouped_kernel, (bool, np.bool_)):
      raise ConfigError(f"Server {self.name!r}: grouped_kernel must be True (grouped expert "
                        f"FFN, cost per used expert) or False (dense over held slots), got "
                        f"{self.grouped_kernel!r}.")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Heterogeneous servers and the links between them.

  Attributes:
    servers: ``N`` server specs.
    bandwidth: ``[N, N]`` bytes/s from server n to server m (diagonal ignored).
    latency: ``[N, N]`` seconds of one message from n to m (diagonal ignored).
  """
  name: str
  servers: tuple[ServerSpec, ...]
  bandwidth: tuple[tuple[float, ...], ...]
  latency: tuple[tuple[float, ...], ...]
  source: str = ""

  def __post_init__(self):
    n = len(self.servers)
    if n == 0:
      raise ConfigError(f"Cluster {self.name!r} has no servers.")
    for key in ("bandwidth", "latency"):
      a = np.asarray(getattr(self, key), dtype=np.float64)
      if a.shape != (n, n):
        raise ConfigError(f"Cluster {self.name!r}: {key} must be an [N, N] = [{n}, {n}] matrix "
                          f"(one row per server), got shape {a.shape}.")
      off = a[~np.eye(n, dtype=bool)]
      if key == "bandwidth" and np.any(~(off > 0)):
        raise ConfigError(f"Cluster {self.name!r}: every off-diagonal bandwidth must be > 0 "
                          f"bytes/s (use a tiny value for a slow link).")
      if key == "latency" and np.any(~(off >= 0)):
        raise ConfigError(f"Cluster {self.name!r}: latencies must be finite and >= 0 seconds.")

  @property
  def num_servers(self) -> int:
    return len(self.servers)

  @property
  def bandwidth_matrix(self) -> np.ndarray:
    """``[N, N]`` float64 bytes/s, diagonal set to +inf (local transfers are free)."""
    b = np.array(self.bandwidth, dtype=np.float64)
    np.fill_diagonal(b, np.inf)
    return b

  @property
  def latency_matrix(self) -> np.ndarray:
    """``[N, N]`` float64 seconds, diagonal zero."""
    lat = np.array(self.latency, dtype=np.float64)
    np.fill_diagonal(lat, 0.0)
    return lat

  @property
  def peak_flops(self) -> np.ndarray:
    return np.array([s.peak_flops for s in self.servers], dtype=np.float64)

  @property
  def mem_bandwidth(self) -> np.ndarray:
    return np.array([s.mem_bandwidth for s in self.servers], dtype=np.float64)

  def expert_memory(self, model: ModelConfig) -> np.ndarray:
    """``[N]`` bytes left for routed experts after dense weights and reserved memory.

    Raises ConfigError when a server cannot even hold the dense weights.
    """
    out = []
    for s in self.servers:
      left = s.memory_bytes - s.reserved_bytes - model.dense_bytes
      if left < 0:
        raise ConfigError(
            f"Server {s.name!r} of cluster {self.name!r} has {s.memory_bytes / GiB:.2f} GiB "
            f"({s.reserved_bytes / GiB:.2f} GiB reserved) but model {model.name!r} needs "
            f"{model.dense_bytes / GiB:.2f} GiB of dense weights on every server; it falls "
            f"short by {-left:,.0f} bytes. Use a larger server or a smaller model.")
      out.append(left)
    return np.array(out, dtype=np.float64)

  def expert_capacity(self, model: ModelConfig) -> np.ndarray:
    """``[N]`` int: how many routed experts (of any layer) fit on each server."""
    return np.floor(self.expert_memory(model) / model.expert_bytes).astype(np.int64)

  def check_fits(self, model: ModelConfig) -> None:
    """Raise ConfigError if the cluster cannot hold every expert of ``model`` at least once."""
    need = model.n_moe_layers * model.n_experts
    cap = self.expert_capacity(model)
    if cap.sum() < need:
      short = (need - cap.sum()) * model.expert_bytes
      raise ConfigError(
          f"Cluster {self.name!r} holds {int(cap.sum())} experts of model {model.name!r} but "
          f"needs {need} (every expert at least once); it falls short by {short:,.0f} bytes "
          f"({short / GiB:.2f} GiB). Add servers or memory, or use a smaller model.")


def uniform_links(n: int, bandwidth: float, latency: float) -> tuple[tuple, tuple]:
  """Full-mesh ``[n, n]`` bandwidth/latency tuples with the same value on every link."""
  bw = tuple(tuple(float(bandwidth) for _ in range(n)) for _ in range(n))
  lat = tuple(tuple(float(latency) for _ in range(n)) for _ in range(n))
  return bw, lat


def with_link(cluster: ClusterConfig, bandwidth: float | None = None,
              latency: float | None = None) -> ClusterConfig:
  """Copy of ``cluster`` with every link set to one bandwidth and/or latency (ablations)."""
  n = cluster.num_servers
  bw = cluster.bandwidth if bandwidth is None else uniform_links(n, bandwidth, 0)[0]
  lat = cluster.latency if latency is None else uniform_links(n, 1, latency)[1]
  return dataclasses.replace(cluster, bandwidth=bw, latency=lat)


# --------------------------------------------------------------------------------------------
# Named presets
# --------------------------------------------------------------------------------------------
def configs_dir() -> Path:
  """The ``configs/`` folder: ``$MOE_EDGE_CONFIGS`` or the repository's own."""
  env = os.environ.get("MOE_EDGE_CONFIGS")
  return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def available(kind: str) -> list[str]:
  """Names of the presets of ``kind`` ("models", "clusters" or "experiments")."""
  folder = configs_dir() / kind
  return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load_preset(kind: str, name: str, **kwargs):
  """Run ``configs/<kind>/<name>.py:get_config(**kwargs)``; unknown names list the known ones."""
  path = configs_dir() / kind / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"Unknown {kind[:-1]} config {name!r}. Known {kind}: "
                      f"{', '.join(available(kind)) or '(none)'} (files under {path.parent}).")
  spec = importlib.util.spec_from_file_location(f"moe_edge_configs.{kind}.{name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(path.parent))  # presets may share helpers (configs/clusters/_devices.py)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(path.parent))
  return module.get_config(**kwargs)


def model_config(name: str | ModelConfig) -> ModelConfig:
  """A model preset by name (``tiny``, ``small_moe``, ``olmoe_1b_7b``, ...)."""
  if isinstance(name, ModelConfig):
    return name
  cfg = load_preset("models", name)
  if not isinstance(cfg, ModelConfig):
    raise ConfigError(f"configs/models/{name}.py must return a ModelConfig.")
  return cfg


def cluster_config(name: str | ClusterConfig, **kwargs) -> ClusterConfig:
  """A cluster preset by name (``edge_hetero_4``, ``edge_hetero_8``, ``homogeneous_4``, ...)."""
  if isinstance(name, ClusterConfig):
    return name
  cfg = load_preset("clusters", name, **kwargs)
  if not isinstance(cfg, ClusterConfig):
    raise ConfigError(f"configs/clusters/{name}.py must return a ClusterConfig.")
  return cfg


def with_expert_memory(cluster: ClusterConfig, model: ModelConfig,
                       copies: float) -> ClusterConfig:
  """Copy of ``cluster`` whose servers have room for ``copies`` full sets of ``model``'s experts.

  The expert memory is split across servers in proportion to their datasheet memory (bigger
  boxes hold more), then the dense weights are added back so :meth:`expert_memory` returns it.
  ``copies=1`` is just enough for one copy of every expert (plus rounding slack of one expert per
  server); ``copies=N`` lets every server hold everything.
  """
  if copies < 1:
    raise ConfigError(f"copies={copies}: the cluster must hold every expert at least once "
                      f"(copies >= 1).")
  need = model.n_moe_layers * model.n_experts * model.expert_bytes * copies
  mem = np.array([s.memory_bytes for s in cluster.servers], dtype=np.float64)
  share = need * mem / mem.sum() + model.expert_bytes  # one expert of slack against flooring
  servers = [dataclasses.replace(s, memory_bytes=float(model.dense_bytes + x), reserved_bytes=0.0)
             for s, x in zip(cluster.servers, share)]
  return dataclasses.replace(cluster, servers=tuple(servers),
                             name=f"{cluster.name}@{copies:g}x")


def with_grouped_kernel(cluster: ClusterConfig, grouped_kernel: bool) -> ClusterConfig:
  """Copy of ``cluster`` whose every server has ``grouped_kernel`` (:class:`ServerSpec`); the
  name gains ``+dense_ffn`` when False. The cluster presets' ``grouped_kernel`` argument."""
  servers = tuple(dataclasses.replace(s, grouped_kernel=grouped_kernel) for s in cluster.servers)
  name = cluster.name if grouped_kernel is True else f"{cluster.name}+dense_ffn"
  return dataclasses.replace(cluster, servers=servers, name=name)


def replace_servers(cluster: ClusterConfig, servers: Sequence[ServerSpec]) -> ClusterConfig:
  return dataclasses.replace(cluster, servers=tuple(servers))

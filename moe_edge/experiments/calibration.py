"""Which calibration the tables' latencies use, stated in one place.

Three choices (``ExperimentConfig.calibration``):

* ``"datasheet"``: every edge GPU at its datasheet peak FLOP/s and memory bandwidth (efficiency
  1.0): the optimistic roofline.
* ``"h100_kernels"`` (the calibration of earlier tables): the efficiency a real JAX expert kernel reached on an
  NVIDIA H100 80GB HBM3 (``results/calibration/gpu_olmoe_expert.json``, an OLMoE-shaped expert
  d=2048 f=1024, and ``gpu_mixtral_expert.json``, d=4096 f=14336; bf16, measured by
  ``moe_edge.cost.calibrate``), expressed as a fraction of the H100 SXM5 *datasheet*
  (989.4 TFLOP/s dense BF16, 3.35 TB/s HBM3), applied to every edge GPU's datasheet numbers.
  This is an approximation: the edge GPUs were not measured, and we assume their kernels reach
  the same fraction of their datasheet as the H100's did. Mixtral uses its own measurement;
  every other model uses the OLMoE-shaped one (DeepSeek-V2-Lite / Qwen1.5-MoE experts are
  d=2048 f=1408, the closest; the small model's experts are far smaller than either).

* ``"h200_grouped"``: the grouped expert FFN (``moe_edge.kernels.grouped_ffn``, tokamax's Mosaic
  GPU kernel) measured on an NVIDIA H200 per expert shape (``results/bench_ffn/h200.json``, see
  ``moe_edge/cost/ffn_calibration.py``), as fractions of the H200 SXM datasheet applied to every
  edge GPU's datasheet: the cost model then assumes such a kernel (cost per used expert) on
  every server.

For ``h100_kernels``, the stored factors of those files are relative to the H100's own micro-
benchmarks (a large matmul and a copy, see ``calibrate.local_server_spec``), so the fitted
kernel rates are ``factor x micro-benchmark`` and the datasheet fractions ``kernel rate / H100
datasheet``.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from moe_edge.config import ClusterConfig, ConfigError, ServerSpec, model_config
from moe_edge.cost.calibrate import Calibration, fit_roofline
from moe_edge.cost.ffn_calibration import grouped_ffn_efficiency

#: NVIDIA H100 SXM5 80GB datasheet: dense BF16 tensor FLOP/s (without sparsity), HBM3 bandwidth.
H100_SXM = ServerSpec("h100_sxm5_80gb", memory_bytes=80e9, peak_flops=989.4e12,
                      mem_bandwidth=3.35e12)
KERNEL_FILES = {"mixtral_8x7b": "gpu_mixtral_expert.json"}
DEFAULT_KERNEL_FILE = "gpu_olmoe_expert.json"
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def repo_root() -> Path:
  return Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class KernelEfficiency:
  """Fractions of the H100 datasheet an expert kernel reached.

  Attributes:
    flops: achieved FLOP/s / 989.4e12 (the FLOP-bound asymptote of the fitted roofline).
    bandwidth: achieved weight-streaming bytes/s / 3.35e12 (the bandwidth-bound asymptote).
    file: the measurement file (relative to the repository).
    shape: ``(d_model, d_ff)`` of the measured expert.
  """
  flops: float
  bandwidth: float
  file: str
  shape: tuple[int, int]

  def describe(self) -> str:
    return (f"H100-measured expert kernel ({self.file}, d={self.shape[0]} f={self.shape[1]}): "
            f"{100 * self.flops:.1f}% of datasheet FLOP/s, {100 * self.bandwidth:.1f}% of "
            f"datasheet memory bandwidth, applied to every edge GPU's datasheet numbers")


@lru_cache(maxsize=None)
def kernel_efficiency(model_name: str) -> KernelEfficiency:
  """The H100 datasheet fractions of the expert kernel measured for ``model_name``'s shape."""
  rel = Path("results") / "calibration" / KERNEL_FILES.get(model_name, DEFAULT_KERNEL_FILE)
  path = repo_root() / rel
  if not path.is_file():
    raise ConfigError(f"calibration 'h100_kernels' needs {rel} (measured on an H100 by "
                      f"moe_edge/cost/calibrate.py); it is missing. Use calibration "
                      f"'datasheet' instead.")
  cal = Calibration.from_dict(json.loads(path.read_text()))
  if 0 not in cal.measurements:
    raise ConfigError(f"{rel} holds factors but no kernel measurement to refit.")
  m = cal.measurements[0]
  if m.dtype not in _ITEMSIZE:
    raise ConfigError(f"{rel}: unexpected dtype {m.dtype!r}.")
  bw, flops = fit_roofline(m.token_counts, m.ffn_seconds,
                           3 * m.d_model * m.d_ff * _ITEMSIZE[m.dtype], 6 * m.d_model * m.d_ff)
  return KernelEfficiency(flops / H100_SXM.peak_flops, bw / H100_SXM.mem_bandwidth, str(rel),
                          (m.d_model, m.d_ff))


def edge_calibration(kind: str, cluster: ClusterConfig, model_name: str) -> Calibration:
  """The :class:`Calibration` of ``cluster`` for ``model_name`` under ``kind``."""
  if kind == "datasheet":
    return Calibration.datasheet(cluster)
  if kind not in ("h100_kernels", "h200_grouped"):
    raise ConfigError(f"unknown calibration {kind!r}; use 'datasheet', 'h100_kernels' or "
                      f"'h200_grouped'.")
  eff = _efficiency(kind, model_name)
  n = cluster.num_servers
  return Calibration(np.full(n, eff.flops), np.full(n, eff.bandwidth), eff.describe(),
                     tuple(s.name for s in cluster.servers))


def describe(kind: str, model_names) -> list[str]:
  """One line per distinct calibration the models use under ``kind``."""
  if kind == "datasheet":
    return ["datasheet roofline (efficiency 1.0 on every server)"]
  seen = {}
  for name in model_names:
    eff = _efficiency(kind, name)
    seen.setdefault((eff.file, eff.shape), (eff, []))[1].append(name)
  return [f"{', '.join(models)}: {eff.describe()}" for eff, models in seen.values()]


def _efficiency(kind: str, model_name: str):
  """``kernel_efficiency`` (h100_kernels) or the grouped FFN's (h200_grouped) of a model."""
  if kind == "h200_grouped":
    cfg = model_config(model_name)
    return grouped_ffn_efficiency(cfg.d_model, cfg.d_ff_expert)
  return kernel_efficiency(model_name)


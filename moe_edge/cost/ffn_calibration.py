"""Kernel efficiency of the grouped expert FFN, from the measured H200 benchmark.

``benchmarks/bench_grouped_ffn.py`` times :func:`moe_edge.kernels.grouped_ffn` (tokamax's Mosaic
GPU kernel) on one H200 and stores, per row, the fraction of the HBM read bandwidth and of the
bf16 matmul rate it reached, both measured in the same run (``results/bench_ffn/h200.json``).
This module turns those rows into the cost model's two efficiency factors for one expert shape,
as fractions of the H200's *datasheet* (989.4 TFLOP/s dense bf16, 4.8 TB/s HBM3e):

  bandwidth = max over decode rows of  (used experts' weight bytes / time) / 4.8e12
  flops     = max over prefill rows of (2 rows 3 d f / time)               / 989.4e12

(the two asymptotes of the roofline, as :func:`moe_edge.cost.calibrate.fit_roofline` takes
them). The cost model then assumes such a grouped kernel on every server, unless the server says
otherwise: an expert costs only when used (``P = sum over used experts of max(W_e / BW_eff,
c F_e / P_eff)``) and every server reaches the H200's fractions of its own datasheet. The edge
GPUs and the paper's A100s were not measured; tokamax also ships an Ampere (sm80) kernel, but
its efficiency there is assumed, not measured. A server with ``ServerSpec(grouped_kernel=
False)`` (a deployment without such a kernel) costs as XLA's ``ragged_dot`` does in the
benchmark's ``lax`` rows, dense over the ``G`` slots it holds in a layer (every held slot's
weights read, every one of its ``R`` rows through every slot): ``max(G W_e / BW_eff,
R G F_e / P_eff)`` (:meth:`moe_edge.core.hardware.Hardware.compute_time`), with the same
efficiency factors: against the benchmark's ``lax`` rows its measured/predicted ratio is
0.79-1.07 (OLMoE decode), 0.58-0.86 (Mixtral, DeepSeek-V2-Lite decode) and 0.50-0.69
(prefill), i.e. it follows their growth with ``G`` and rows and over-predicts by up to 2x
(``tests/cost/test_grouped_kernel.py`` checks the window).

Shapes without a measurement take the measured shape nearest in ``d x f`` (the small model's
experts are far smaller than any).
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from moe_edge.config import ServerSpec
from moe_edge.core.errors import MoeEdgeError

#: NVIDIA H200 SXM datasheet: dense BF16 tensor FLOP/s (the H100's), HBM3e bandwidth.
H200_SXM = ServerSpec("h200_sxm_141gb", memory_bytes=141e9, peak_flops=989.4e12,
                      mem_bandwidth=4.8e12)
DEFAULT_FILE = Path("results") / "bench_ffn" / "h200.json"
BACKEND = "mosaic"


class FfnCalibrationError(MoeEdgeError):
  """The grouped-FFN benchmark file is missing or lacks the rows a calibration needs."""


@dataclasses.dataclass(frozen=True)
class GroupedFfnEfficiency:
  """Fractions of the H200 datasheet the grouped FFN reached for one expert shape.

  Attributes:
    flops: best prefill FLOP/s / 989.4e12.
    bandwidth: best decode weight-streaming bytes/s / 4.8e12.
    file: the benchmark JSON (relative to the repository).
    shape: ``(d_model, d_ff)`` of the measured expert used.
    model: the benchmark's model name of that shape.
  """
  flops: float
  bandwidth: float
  file: str
  shape: tuple[int, int]
  model: str

  def describe(self) -> str:
    return (f"grouped expert FFN (tokamax Mosaic, H200-measured, {self.file}, "
            f"d={self.shape[0]} f={self.shape[1]}): {100 * self.flops:.1f}% of datasheet "
            f"FLOP/s, {100 * self.bandwidth:.1f}% of datasheet memory bandwidth, applied to "
            f"every server's datasheet; experts cost only when used")


def _load(path: Path) -> dict:
  if not path.is_file():
    raise FfnCalibrationError(f"{path} is missing: run benchmarks/bench_grouped_ffn.py on an "
                              f"H200 (benchmarks/gpu_ffn.sh), or use another calibration.")
  return json.loads(path.read_text())


def efficiency_from_bench(bench: dict, d_model: int, d_ff: int,
                          file: str = str(DEFAULT_FILE)) -> GroupedFfnEfficiency:
  """:class:`GroupedFfnEfficiency` of the measured shape nearest ``(d_model, d_ff)``."""
  rows = [r for r in bench.get("rows", []) if r.get("backend") == BACKEND]
  if not rows:
    raise FfnCalibrationError(f"{file} has no {BACKEND!r} rows; rerun the benchmark with "
                              f"--backends including {BACKEND}.")
  shapes = {(r["d"], r["f"]): r["model"] for r in rows}
  d, f = min(shapes, key=lambda s: (s != (d_model, d_ff), abs(s[0] * s[1] - d_model * d_ff)))
  mine = [r for r in rows if (r["d"], r["f"]) == (d, f)]
  peaks = bench["peaks"]
  decode = [r["hbm_fraction"] for r in mine if r["phase"] == "decode"]
  prefill = [r["flop_fraction"] for r in mine if r["phase"] == "prefill"]
  if not decode or not prefill:
    raise FfnCalibrationError(f"{file}: shape d={d} f={f} needs decode and prefill rows.")
  bw = max(decode) * peaks["hbm_read_bytes_per_s"] / H200_SXM.mem_bandwidth
  fl = max(prefill) * peaks["bf16_matmul_flops"] / H200_SXM.peak_flops
  return GroupedFfnEfficiency(fl, bw, file, (d, f), shapes[(d, f)])


@lru_cache(maxsize=None)
def grouped_ffn_efficiency(d_model: int, d_ff: int, root: str | None = None
                           ) -> GroupedFfnEfficiency:
  """The committed H200 benchmark's efficiency for an expert of ``(d_model, d_ff)``.

  ``root``: the repository (default: this checkout).
  """
  base = Path(root) if root is not None else Path(__file__).resolve().parents[2]
  return efficiency_from_bench(_load(base / DEFAULT_FILE), d_model, d_ff, str(DEFAULT_FILE))


__all__ = ["FfnCalibrationError", "GroupedFfnEfficiency", "H200_SXM", "efficiency_from_bench",
           "grouped_ffn_efficiency"]

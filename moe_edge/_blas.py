"""Pin OpenBLAS' kernel so that results reproduce across x86-64 machines.

numpy's OpenBLAS (``DYNAMIC_ARCH``) picks its matrix kernels by CPU at load time, and kernels of
different vector widths sum in different orders: the last bits of a ``@`` differ between an
AVX-512 and an AVX2 machine. DanceMoE's greedy (``placement/dancemoe.py``, ``exchange.py``)
compares gains computed that way, so a near-tie can flip and change its placement (measured:
OLMoE-1B-7B on edge_hetero_4, decode 117.04 ms with the SkylakeX kernel, 117.14 ms with Haswell
or Zen). Importing ``moe_edge`` before numpy sets ``OPENBLAS_CORETYPE=Haswell`` (the AVX2
kernel the committed results were made with) on x86-64 CPUs that have AVX2, unless the user set
``OPENBLAS_CORETYPE`` already; after numpy is loaded it can no longer act and does nothing.
"""
from __future__ import annotations

import os
import platform
import sys

KERNEL = "Haswell"


def _has_avx2() -> bool:
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return any(line.startswith("flags") and " avx2" in line for line in f)
  except OSError:
    return False


def pin_openblas_kernel(environ=os.environ, modules=sys.modules, machine: str | None = None,
                        has_avx2=_has_avx2) -> bool:
  """Set ``OPENBLAS_CORETYPE`` to :data:`KERNEL` when it can still take effect (numpy not yet
  imported), is not set by the user, and the CPU is x86-64 with AVX2; True when it did."""
  machine = platform.machine() if machine is None else machine
  if ("OPENBLAS_CORETYPE" in environ or "numpy" in modules
      or machine.lower() not in ("x86_64", "amd64") or not has_avx2()):
    return False
  environ["OPENBLAS_CORETYPE"] = KERNEL
  return True

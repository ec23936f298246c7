"""moe_edge pins OpenBLAS' AVX2 kernel before numpy loads (``moe_edge/_blas.py``), so DanceMoE's
near-ties fall the same way on AVX-512 and AVX2 machines; a user's own setting wins."""
import os
import subprocess
import sys

from moe_edge._blas import KERNEL, _has_avx2, pin_openblas_kernel


def _pin(**kw):
  env = kw.pop("environ", {})
  args = dict(environ=env, modules=kw.pop("modules", {}), machine=kw.pop("machine", "x86_64"),
              has_avx2=kw.pop("has_avx2", lambda: True))
  return pin_openblas_kernel(**args), env


def test_pins_on_an_avx2_x86_machine_before_numpy():
  done, env = _pin()
  assert done and env == {"OPENBLAS_CORETYPE": KERNEL}


def test_leaves_the_kernel_alone_when_it_cannot_or_should_not_act():
  assert _pin(environ={"OPENBLAS_CORETYPE": "Zen"}) == (False, {"OPENBLAS_CORETYPE": "Zen"})
  assert _pin(modules={"numpy": object()}) == (False, {})
  assert _pin(machine="aarch64") == (False, {})
  assert _pin(has_avx2=lambda: False) == (False, {})


def test_importing_moe_edge_first_sets_it_in_a_fresh_interpreter():
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
  code = "import moe_edge, os; print(os.environ.get('OPENBLAS_CORETYPE'))"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == (KERNEL if _has_avx2() else "None")
  late = "import numpy, moe_edge, os; print(os.environ.get('OPENBLAS_CORETYPE'))"
  assert subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True,
                        check=True).stdout.strip() == "None"

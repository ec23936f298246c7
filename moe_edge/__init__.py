"""moe-edge: collaborative Mixture-of-Experts inference across heterogeneous edge servers."""
from moe_edge._blas import pin_openblas_kernel as _pin_openblas_kernel

_pin_openblas_kernel()  # before numpy loads: results reproduce across x86-64 machines (_blas.py)

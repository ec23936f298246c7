"""Stand-in for xprof.cli.tools on the GPU machine (see ../../README.md): tokamax imports this
name at import time but its kernels never call it."""


def get_kernel_stats_tool(*args, **kwargs):
  raise RuntimeError("xprof is stubbed on this machine (benchmarks/xprof_stub); install the real "
                     "xprof (pip install -e '.[gpu]') for tokamax's profiling tools.")

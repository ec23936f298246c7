"""The paper's experiment, quick: the full preset with shorter runs (under 2 minutes on 2 cores).

Same testbed, models, workloads and methods as paper_testbed.py; 4 simulated minutes of arrivals
per table run instead of 30, a 10-minute shift run (shift at 4 minutes, the paper's re-plan every
2 minutes instead of 5), a 2 x 2 scaling sweep. What `make demo` ends with.

  python experiments/paper_table.py --config configs/experiments/paper_testbed_quick.py
"""
import importlib.util
from pathlib import Path

import ml_collections


def _full() -> ml_collections.ConfigDict:
  path = Path(__file__).with_name("paper_testbed.py")
  spec = importlib.util.spec_from_file_location("paper_testbed_full", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  c = _full()
  c.name = "paper_testbed_quick"
  c.description = __doc__.splitlines()[0]
  c.duration_s = 240.0
  c.profile_duration_s = 240.0
  c.shift_at_s = 240.0
  c.shift_duration_s = 600.0
  c.paper_replan_s = 120.0
  c.ours_check_s = 60.0
  c.stats_window_s = 120.0
  c.shift_bin_s = 60.0
  c.scaling_gpus = (4, 16)
  c.scaling_link_mbps = (100.0, 1000.0)
  c.scaling_methods = ("eplb_hetero", "prism")
  c.scaling_duration_s = 60.0
  c.scaling_loads = ("per_server",)
  c.sweep_settings = ("deepseek_v2_lite:specialised",)
  c.sweep_duration_s = 240.0
  return c

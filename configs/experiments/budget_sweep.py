"""Budgeted expert selection on real text (experiments/budget_sweep.py): the keys of
moe_edge.experiments.extension_settings.BudgetSweepConfig and HarnessSettings."""
import importlib.util
from pathlib import Path

from ml_collections import config_dict


def _harness() -> dict:
  spec = importlib.util.spec_from_file_location("_harness", Path(__file__).with_name("_harness.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.harness_settings()


def get_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      _harness(),
      kinds=("latency", "energy"),
      # per token and layer, in units of one remote choice's mean cost ("inf" = no budget)
      budget_units=("0", "0.1", "0.5", "1.05", "1.5", "2.1", "inf"),
      variants=("force+renorm", "force+raw", "free+renorm"),  # force|free + renorm|raw
      solver="greedy",  # greedy or exact, inside the model
      instances=20000,  # random instances per k for greedy vs exact
      decode_batch=1))  # requests per server per decode step (cost model)

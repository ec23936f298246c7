"""Importance-driven substitution on real text (experiments/substitution_sweep.py): the keys of
moe_edge.experiments.extension_settings.SubstitutionSweepConfig and HarnessSettings."""
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
      # gate thresholds (with top-2 renormalised gates the second choice always has gate <= 0.5,
      # so above 0.5 top-1 choices get substituted too)
      thresholds=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.8, 1.0),
      similarities=("output", "response", "random"),  # of output, response, flat, random
      scaled_similarities=("output",),  # also run with the substitute's gate x its similarity
      tolerances=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0),  # local-preferring top-k (() = skip)
      drop=True,  # the control that drops remote low-gate choices
      drop_renormalize=False,  # rescale its kept gates (budget_sweep finds raw gates better)
      decode_batches=(1, 8)))  # requests per server per decode step (the first is summarised)

"""The migration goal over seeds, drifts and move budgets (experiments/migration_sweep.py): every
combination of seeds x drift_presets x budgets ('copies per interval:horizon') x prefix_steps runs
the migration experiment whose base settings are `run` (configs/experiments/migration.py;
override e.g. --config.run.steps=18).
"""
import importlib.util
from pathlib import Path

from ml_collections import config_dict


def _migration_preset() -> config_dict.ConfigDict:
  spec = importlib.util.spec_from_file_location("_migration_preset",
                                                Path(__file__).with_name("migration.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      seeds=(0, 1, 2), drift_presets=("pairs", "mix", "all"),
      budgets=("64:1", "96:1", "128:1", "192:2"), prefix_steps=(0, 16),
      keep_runs=False, run=_migration_preset()))

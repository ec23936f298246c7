"""Runtime migration under workload drift (experiments/migration.py): OLMoE-1B-7B statistics on
edge_hetero_4 at 1 Gbit/s with 1.5 copies of expert memory, 96 trace steps of 64 tokens per
server, intervals of 8 steps, servers' home domains swapping in pairs at steps 32 and 64; the
incremental policy copies at most 192 experts per interval in campaigns of up to 2 intervals,
judged by the prefix trigger. Every key is a setting of
moe_edge.experiments.migration_run.MigrationRun or moe_edge.migration.config.MigrationConfig.
"""
from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      # workload and cluster
      source="stats", model="olmoe_1b_7b", cluster="edge_hetero_4", link_gbps=1.0,
      copies=1.5, alpha=0.8, seed=0, request_len=64, steps=96,
      drift=config_dict.placeholder(str), drift_preset="pairs",
      # replay (MigrationConfig)
      interval=8, policies=("none", "full_replan", "incremental"), lam=1.0, max_moves=192,
      max_mb=config_dict.placeholder(float), trigger=True, horizon=2, prefix_step=16,
      serving_steps_per_interval=2000.0, safety=2.0, interference=1.0, cross_validate=True,
      stats_kind="window", ema_decay=0.9, max_concurrent_per_link=1,
      # failure drill (fail_server -1 = none) and goals
      fail_server=-1, fail_step=-1, storage_gbps=2.0,
      coverage_target=0.95, recovery_intervals=2, move_fraction=0.25))

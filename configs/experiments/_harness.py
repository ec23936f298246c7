"""The workload settings both extension sweeps share (moe_edge.experiments.extension_settings.
HarnessSettings): the trained small_moe on edge_hetero_4 at 1 Gbit/s, 1.5 copies of expert
memory, DanceMoE placement fitted on a train-split calibration workload, held-out evaluation."""


def harness_settings() -> dict:
  return dict(model="small_moe", checkpoint="checkpoints/small_moe/final",
              cluster="edge_hetero_4", link_gbps=1.0, copies=1.5, method="dancemoe", alpha=0.8,
              requests_per_server=16, calib_requests_per_server=8, seq_len=256, seed=0,
              batch_rows=16, pj_per_flop=3.0, nj_per_byte=20.0)

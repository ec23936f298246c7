"""The paper's testbed: 4 x A100 40 GB split into 3 edge servers of 1, 1 and 2 GPUs, 500 Mbps.

As PAPER.md summarises it: one machine, four A100-40GB GPUs split into three logical edge servers
(1, 1 and 2 GPUs), a container network between them capped at 500 Mbps with Linux tc, usable GPU
memory capped (70% for Mixtral-8x7B, 30% for DeepSeek-V2-Lite: an experiment-level option,
``memory_fraction``, since it depends on the model).

A100-40GB (NVIDIA A100 datasheet): 40 GiB HBM2 at 1,555 GB/s, 312 TFLOP/s dense bf16.

The 2-GPU server is one server of the cost model with the two GPUs pooled: memory, HBM bandwidth
and FLOP/s summed, the bandwidth and FLOP/s scaled by ``pool_efficiency`` (default 0.9). Why
pooled: the server's experts are split over its two GPUs (expert parallelism inside the box) and
both stream their own experts concurrently, so their rates add; what is lost is the imbalance
between the two halves and the NVLink hop of the tokens whose expert sits on the other GPU. That
hop is cheap next to the testbed's links: a 4 KB (DeepSeek-V2-Lite) or 8 KB (Mixtral) activation
takes about 0.01 us on A100 NVLink (600 GB/s) plus a few us of launch per layer, against 65-130 us
of transfer alone on 500 Mbps, so the pool's loss is modelled as a rate factor, not as a link.
0.9 is our assumption (the paper states none); ``pool_efficiency=1.0`` gives the ideal pool.

Links: 500 Mbps full mesh (tc caps each container's egress), 0.1 ms per message (containers on
one host: the bridge's round trip is tens of microseconds; tc adds queueing, which the bandwidth
term carries).

Scaling (the paper's simulator covers 4 to 256 GPUs): ``num_gpus`` repeats the 1, 1, 2 pattern,
one group of three servers per four GPUs (``num_gpus`` must be a multiple of 4).

``kv_reserve_bytes`` is kept free of experts on every GPU for KV caches and activations
(ServerSpec.reserved_bytes; placement leaves it free, the scheduler spends it on KV).
"""
from moe_edge.config import ClusterConfig, ConfigError, GiB, ServerSpec, uniform_links

A100_MEMORY = 40 * GiB
A100_BANDWIDTH = 1555e9
A100_FLOPS = 312e12
MBPS = 1e6 / 8  # bytes/s of one megabit per second
PATTERN = (1, 1, 2)  # GPUs per server of one group


def a100_server(gpus: int, memory_fraction: float, pool_efficiency: float,
                kv_reserve_bytes: float) -> ServerSpec:
  """One edge server of ``gpus`` pooled A100-40GB with usable memory ``memory_fraction``."""
  eff = 1.0 if gpus == 1 else pool_efficiency
  return ServerSpec(f"a100_40gb_x{gpus}", memory_bytes=gpus * memory_fraction * A100_MEMORY,
                    peak_flops=gpus * A100_FLOPS * eff,
                    mem_bandwidth=gpus * A100_BANDWIDTH * eff,
                    reserved_bytes=gpus * kv_reserve_bytes)


def get_config(memory_fraction: float = 1.0, link_mbps: float = 500.0, latency_s: float = 1e-4,
               num_gpus: int = 4, pool_efficiency: float = 0.9,
               kv_reserve_bytes: float = 0.0) -> ClusterConfig:
  if not 0 < memory_fraction <= 1:
    raise ConfigError(f"paper_testbed: memory_fraction must be in (0, 1] (the share of each "
                      f"GPU's 40 GiB the model may use), got {memory_fraction}.")
  if not 0 < pool_efficiency <= 1:
    raise ConfigError(f"paper_testbed: pool_efficiency must be in (0, 1], got "
                      f"{pool_efficiency}.")
  if int(num_gpus) != num_gpus or num_gpus < 4 or num_gpus % 4:
    raise ConfigError(f"paper_testbed: num_gpus must be a multiple of 4 (groups of 1, 1 and 2 "
                      f"GPUs), got {num_gpus}.")
  gpus = PATTERN * (int(num_gpus) // 4)
  servers = tuple(a100_server(g, memory_fraction, pool_efficiency, kv_reserve_bytes)
                  for g in gpus)
  bw, lat = uniform_links(len(servers), link_mbps * MBPS, latency_s)
  return ClusterConfig(
      name=f"paper_testbed_{int(num_gpus)}gpu@{link_mbps:g}mbps_mem{memory_fraction:g}",
      servers=servers, bandwidth=bw, latency=lat, source=__doc__.splitlines()[0])

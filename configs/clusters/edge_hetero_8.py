"""Eight heterogeneous edge servers in two racks of four (default 1 Gbps inside a rack, half of
it across racks with twice the latency).

Rack 0: RTX 4090, RTX 3090, RTX A4000, Jetson AGX Orin 32 GB.
Rack 1: RTX 4080, RTX 3080, RTX A5000, Jetson Orin NX 16 GB.
"""
from moe_edge.config import ClusterConfig, with_grouped_kernel
from _devices import (A4000, A5000, GBPS, ORIN_AGX_32, ORIN_NX_16, RTX3080, RTX3090, RTX4080,
                            RTX4090)


def get_config(link_gbps: float = 1.0, latency_s: float | None = None,
               grouped_kernel: bool = True) -> ClusterConfig:
  servers = (RTX4090, RTX3090, A4000, ORIN_AGX_32, RTX4080, RTX3080, A5000, ORIN_NX_16)
  lat = latency_s if latency_s is not None else (5e-4 if link_gbps <= 1 else 1e-4)
  rack = [i // 4 for i in range(len(servers))]
  bw = tuple(tuple(link_gbps * GBPS * (1.0 if rack[i] == rack[j] else 0.5)
                   for j in range(8)) for i in range(8))
  lt = tuple(tuple(lat * (1.0 if rack[i] == rack[j] else 2.0) for j in range(8))
             for i in range(8))
  cluster = ClusterConfig(name=f"edge_hetero_8@{link_gbps:g}gbps", servers=servers, bandwidth=bw,
                          latency=lt, source=__doc__.splitlines()[0])
  return with_grouped_kernel(cluster, grouped_kernel)

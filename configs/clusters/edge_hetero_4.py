"""Four heterogeneous edge servers on a switched LAN (default 1 Gbps, 0.5 ms per message).

RTX 4090 box, RTX 3090 box, RTX A4000 box and a Jetson AGX Orin 32 GB (numbers in _devices.py).
``get_config(link_gbps=10)`` gives the 10 Gbps variant (0.1 ms).
"""
from moe_edge.config import ClusterConfig, uniform_links, with_grouped_kernel
from _devices import A4000, GBPS, ORIN_AGX_32, RTX3090, RTX4090


def get_config(link_gbps: float = 1.0, latency_s: float | None = None,
               grouped_kernel: bool = True) -> ClusterConfig:
  servers = (RTX4090, RTX3090, A4000, ORIN_AGX_32)
  lat = latency_s if latency_s is not None else (5e-4 if link_gbps <= 1 else 1e-4)
  bw, lt = uniform_links(len(servers), link_gbps * GBPS, lat)
  cluster = ClusterConfig(name=f"edge_hetero_4@{link_gbps:g}gbps", servers=servers, bandwidth=bw,
                          latency=lt, source=__doc__.splitlines()[0])
  return with_grouped_kernel(cluster, grouped_kernel)

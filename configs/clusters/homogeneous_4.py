"""Four identical RTX 3090 servers on a 1 Gbps LAN: the homogeneous control."""
from moe_edge.config import ClusterConfig, uniform_links, with_grouped_kernel
from _devices import GBPS, RTX3090


def get_config(link_gbps: float = 1.0, latency_s: float | None = None,
               num_servers: int = 4, grouped_kernel: bool = True) -> ClusterConfig:
  servers = tuple(RTX3090 for _ in range(num_servers))
  lat = latency_s if latency_s is not None else (5e-4 if link_gbps <= 1 else 1e-4)
  bw, lt = uniform_links(len(servers), link_gbps * GBPS, lat)
  cluster = ClusterConfig(name=f"homogeneous_{num_servers}@{link_gbps:g}gbps", servers=servers,
                          bandwidth=bw, latency=lt, source=__doc__.splitlines()[0])
  return with_grouped_kernel(cluster, grouped_kernel)

"""Small seeded placement problems shared by the placement tests (imported by them)."""
import numpy as np

from moe_edge.config import ClusterConfig, ModelConfig, ServerSpec, uniform_links
from moe_edge.placement.problem import PlacementProblem, link_time_per_token

SPEEDS = (80e12, 40e12, 20e12, 60e12, 10e12, 30e12)  # FLOP/s of the test servers, in turn


def small_model(layers: int, experts: int, top_k: int = 2) -> ModelConfig:
  return ModelConfig(name=f"test_{layers}x{experts}", vocab_size=64, d_model=16, n_layers=layers,
                     n_heads=2, n_kv_heads=2, head_dim=8, n_experts=experts,
                     top_k=min(top_k, experts), d_ff_expert=32, source="test")


def small_cluster(n: int, racks: bool = False) -> ClusterConfig:
  """``n`` servers of different speeds; ``racks``: two racks, half the bandwidth across."""
  servers = tuple(ServerSpec(f"s{i}", memory_bytes=1e9, peak_flops=SPEEDS[i % len(SPEEDS)],
                             mem_bandwidth=1e11) for i in range(n))
  if racks:
    side = [i < (n + 1) // 2 for i in range(n)]
    bw = tuple(tuple(1e8 if side[i] == side[j] else 5e7 for j in range(n)) for i in range(n))
    lat = tuple(tuple(1e-4 if side[i] == side[j] else 2e-4 for j in range(n)) for i in range(n))
  else:
    bw, lat = uniform_links(n, 1e8, 1e-4)
  return ClusterConfig(f"test_{n}{'_racks' if racks else ''}", servers, bw, lat)


def zipf_freq(rng: np.random.Generator, n: int, l: int, e: int, k: int,
              skew: float = 1.0) -> np.ndarray:
  """``[N, L, E]`` skewed frequencies (each row sums to ``k``), hot experts differ by server."""
  ranks = np.argsort(rng.random((n, l, e)), axis=2) + 1.0
  f = ranks ** -skew * rng.uniform(0.5, 1.5, (n, l, e))
  return k * f / f.sum(axis=2, keepdims=True)


def make_problem(n: int = 3, l: int = 2, e: int = 6, seed: int = 0, copies: float = 1.5,
                 racks: bool = False) -> PlacementProblem:
  """A seeded problem with heterogeneous capacities holding ``copies`` sets of experts."""
  rng = np.random.default_rng(seed)
  model = small_model(l, e)
  cluster = small_cluster(n, racks)
  share = rng.uniform(0.5, 1.5, n)
  cap = np.floor(copies * l * e * share / share.sum()).astype(np.int64)
  cap[np.argmax(share)] += max(0, l * e - cap.sum())  # exactly enough when copies == 1
  tokens = rng.uniform(0.5, 2.0, n)
  return PlacementProblem.build(model, cluster, zipf_freq(rng, n, l, e, model.top_k), tokens,
                                capacity=cap)


def balanced_lam(problem: PlacementProblem) -> float:
  """A ``lam`` that makes the compute term about as large as the comm term."""
  tau = link_time_per_token(problem.model, problem.cluster)
  t = problem.model.expert_flops_per_token / problem.cluster.peak_flops
  return float(tau[~np.eye(len(t), dtype=bool)].mean() / t.mean())


CASES = [dict(n=3, l=2, e=6, seed=0, copies=1.0),
         dict(n=3, l=2, e=6, seed=1, copies=1.5),
         dict(n=4, l=3, e=8, seed=2, copies=1.3, racks=True),
         dict(n=5, l=2, e=10, seed=3, copies=2.5),
         dict(n=4, l=2, e=8, seed=4, copies=1.0, racks=True)]

"""Routing statistics of any model and any number of domains: a user-made six-domain file for
another model (no top-1 or cross-layer counts) loads by path, drives a trace and place.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_edge.config import cluster_config
from moe_edge.core.routing_stats import RoutingStats, StatsError
from moe_edge.placement.problem import Placement
from moe_edge.workload.stats_traces import resolve_stats, sample_stats_trace
from conftest import load_script

REPO = Path(__file__).resolve().parents[2]
DOMAINS6 = ("law", "med", "code", "chat", "math", "news")


def user_stats(path: Path, num_layers=4, num_experts=16, top_k=2, tokens=500, seed=0) -> Path:
  """A six-domain RoutingStats file: domain d prefers experts near 2d+1 at layers 0 and 2."""
  rng = np.random.default_rng(seed)
  layers = (0, 2)
  counts = np.zeros((len(DOMAINS6), len(layers), num_experts), np.int64)
  for d in range(len(DOMAINS6)):
    for r in range(len(layers)):
      logits = -0.7 * np.abs(np.arange(num_experts) - (2 * d + 1 + 3 * r) % num_experts)
      for _ in range(tokens):
        pick = np.argsort(-(logits + rng.gumbel(size=num_experts)))[:top_k]
        counts[d, r, pick] += 1
  np.savez(path, domains=np.array(DOMAINS6), layers=np.array(layers),
           num_layers=np.array(num_layers), num_experts=np.array(num_experts),
           top_k=np.array(top_k), counts=counts)
  return path


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
  return user_stats(tmp_path_factory.mktemp("stats") / "lab_moe_domain_counts.npz")


def test_a_user_file_loads_and_drives_a_trace(stats_file):
  st = resolve_stats(stats_file)
  assert st.name == "lab_moe" and st.domains == DOMAINS6 and st.counts_top1 is None
  assert st.cross is None and st.tokens_per_domain.tolist() == [500] * 6
  trace = sample_stats_trace(stats_file, 3, 640, 1.0, 0, home_domains=("math", "law", "news"))
  assert trace.model == "lab_moe" and trace.expert_ids.shape[1:] == (4, 2)
  assert json.loads(trace.note)["homes"] == ["math", "law", "news"]
  # alpha = 1: every request of server 0 is from "math": its layer-0 top expert is math's.
  top = np.bincount(trace.expert_ids[trace.server == 0, 0].ravel(), minlength=16).argmax()
  assert top == st.counts[DOMAINS6.index("math"), 0].argmax()
  rr = sample_stats_trace(stats_file, 8, 128, 0.8, 0)  # round robin over the six domains
  assert json.loads(rr.note)["homes"] == list(DOMAINS6) + ["law", "med"]
  again = RoutingStats.load(st.save(stats_file.parent / "copy.npz"), "lab_moe")
  assert np.array_equal(again.counts, st.counts) and again.domains == st.domains


def test_bad_user_files_say_what_is_wrong(stats_file, tmp_path):
  with pytest.raises(StatsError, match="no routing statistics file"):
    resolve_stats(tmp_path / "missing.npz")
  with np.load(stats_file) as z:
    arrays = dict(z)
  arrays["counts"] = arrays["counts"][:, :, :15]
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(StatsError, match="counts has shape"):
    resolve_stats(tmp_path / "bad.npz")
  with pytest.raises(Exception, match="unknown home domain 'arxiv'.*law, med"):
    sample_stats_trace(stats_file, 2, 64, 0.8, 0, home_domains=("arxiv", "law"))


def test_place_script_with_user_stats_and_home_domains(stats_file, tmp_path, shared_data):
  env = dict(os.environ, MOE_EDGE_DATA=str(shared_data), JAX_PLATFORMS="cpu")
  out = tmp_path / "placements"
  args = [sys.executable, str(REPO / "experiments" / "place.py"), "--stats", str(stats_file),
          "--model", "small_moe", "--cluster", "edge_hetero_4", "--copies", "1.5",
          "--tokens_per_server", "256", "--methods", "uniform_ep,dancemoe", "--out", str(out)]
  proc = subprocess.run(args + ["--home_domains", "news,code,law,math"], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert Placement.load(out / "dancemoe.json").hosts.shape == (4, 4, 16)
  short = subprocess.run(args + ["--home_domains", "news,code"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
  assert short.returncode != 0 and "names 2 domains for the 4 servers" in short.stderr
  assert "Traceback" not in short.stderr


def test_load_workload_checks_the_model_shape(stats_file):
  place = load_script("place")
  with pytest.raises(ValueError, match=r"\(L, E, k\) = \(2, 8, 2\).*\(4, 16, 2\)"):
    place.load_workload(None, str(stats_file), "tiny", cluster_config("edge_hetero_4"), 64,
                        0.8, 0)
  with pytest.raises(StatsError, match="unknown domain 'arxiv'"):
    place.load_workload(None, str(stats_file), "small_moe", cluster_config("edge_hetero_4"),
                        64, 0.8, 0, ["arxiv", "law", "med", "code"])

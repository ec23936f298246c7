"""The paper experiment's config, testbed and workloads: presets load, bad input is one line."""
import numpy as np
import pytest

from moe_edge.config import ConfigError, GiB, cluster_config, load_preset, model_config
from moe_edge.experiments.paper_config import paper_config


@pytest.fixture(scope="module")
def quick():
  return load_preset("experiments", "paper_testbed_quick")


def test_presets_load_and_quick_only_shortens_the_runs(quick):
  full = paper_config(load_preset("experiments", "paper_testbed"))
  q = paper_config(quick)
  assert (q.models, q.workloads, q.methods, q.cluster, q.link_mbps, q.memory_fraction,
          q.prompt_tokens, q.output_tokens) == (full.models, full.workloads, full.methods,
                                                full.cluster, full.link_mbps,
                                                full.memory_fraction, full.prompt_tokens,
                                                full.output_tokens)
  assert q.duration_s < full.duration_s
  spec = full.workload("specialised")
  assert spec.homes == ("github", "arxiv", "wikipedia") and spec.alpha == 1.0
  assert spec.interarrival_s == 10.0
  multi = full.workload("multidata")
  assert multi.homes == ("c4", "book", "wikipedia") and multi.alpha == 0.6
  assert multi.interarrival_s == 20.0
  assert dict(full.memory_fraction) == {"mixtral_8x7b": 0.7, "deepseek_v2_lite": 0.3}


def test_testbed_servers_pool_the_two_gpu_box():
  c = cluster_config("paper_testbed", memory_fraction=0.3, pool_efficiency=0.9)
  one, _, two = c.servers
  assert c.num_servers == 3
  assert two.memory_bytes == 2 * one.memory_bytes == 2 * 0.3 * 40 * GiB
  assert two.mem_bandwidth == pytest.approx(2 * 0.9 * one.mem_bandwidth)
  assert two.peak_flops == pytest.approx(2 * 0.9 * one.peak_flops)
  off = c.bandwidth_matrix[~np.eye(3, dtype=bool)]
  assert np.all(off == 500e6 / 8)
  big = cluster_config("paper_testbed", num_gpus=256)
  assert big.num_servers == 192
  assert sum(s.memory_bytes for s in big.servers) == pytest.approx(256 * 40 * GiB)
  # the paper's caps hold each model's experts once, with room to spare
  for model, frac in (("mixtral_8x7b", 0.7), ("deepseek_v2_lite", 0.3)):
    cluster_config("paper_testbed", memory_fraction=frac).check_fits(model_config(model))


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory_fraction=1.5), "memory_fraction must be in"),
    (dict(num_gpus=6), "multiple of 4"),
    (dict(pool_efficiency=0.0), "pool_efficiency"),
])
def test_testbed_bad_input(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    cluster_config("paper_testbed", **kwargs)


def test_cluster_that_cannot_hold_every_expert_once():
  c = cluster_config("paper_testbed", memory_fraction=0.5)
  with pytest.raises(ConfigError, match="holds .* experts of model 'mixtral_8x7b' but needs 256"):
    c.check_fits(model_config("mixtral_8x7b"))


@pytest.mark.parametrize("change, match", [
    (lambda c: c.workloads.specialised.update(homes=("github", "tako", "arxiv")),
     r"domains \['tako'\] are not in the routing statistics"),
    (lambda c: c.workloads.multidata.update(alpha=1.5), "alpha must lie in"),
    (lambda c: c.workloads.multidata.update(interarrival_s=0.0), "interarrival_s must be"),
    (lambda c: c.update(shift_to="bigbench"), "shift_to='bigbench' is not among"),
    (lambda c: c.update(models=("mixtral_8x7b", "gpt5")), r"unknown models \['gpt5'\]"),
    (lambda c: c.memory_fraction.update(mixtral_8x7b=0.0), "memory_fraction values"),
    (lambda c: c.update(prompt_tokens=(512, 128)), "prompt_tokens must be"),
    (lambda c: c.update(shift_policies=("none", "sometimes")), "unknown shift policies"),
    (lambda c: c.update(scaling_gpus=(4, 10)), "multiples of 4"),
])
def test_config_bad_input_is_one_line(quick, change, match):
  c = quick.copy_and_resolve_references()
  change(c)
  with pytest.raises(ConfigError, match=match) as e:
    paper_config(c)
  assert "\n" not in str(e.value)


def test_unknown_field_is_named(quick):
  c = quick.copy_and_resolve_references()
  c.unlock()
  c.durations_s = 3.0
  with pytest.raises(ConfigError, match=r"unknown paper-experiment fields \['durations_s'\]"):
    paper_config(c)

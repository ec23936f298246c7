"""Plackett-Luce inclusion probabilities, their calibration, and Gumbel-top-k sampling."""
import itertools

import numpy as np
import pytest

from moe_edge.workload.sampling import (SamplingError, calibrate_inclusion, gumbel_top_k,
                                        plackett_luce_inclusion)


def _brute_force_inclusion(w, k):
  """Sum over every ordered k-tuple of its sequential-draw probability."""
  w = np.asarray(w, np.float64) / np.sum(w)
  incl = np.zeros(len(w))
  for seq in itertools.permutations(range(len(w)), k):
    p, left = 1.0, 1.0
    for j in seq:
      p *= w[j] / left
      left -= w[j]
    for j in seq:
      incl[j] += p
  return incl


@pytest.mark.parametrize("e,k", [(5, 2), (6, 3), (7, 1), (4, 4)])
def test_inclusion_matches_enumeration(e, k):
  rng = np.random.default_rng(e * 10 + k)
  w = rng.gamma(0.5, size=(3, e)) + 1e-3
  got = plackett_luce_inclusion(np.log(w), k)
  ref = np.stack([_brute_force_inclusion(row, k) for row in w])
  assert np.allclose(got, ref, atol=1e-9)


def test_inclusion_with_zero_weight_experts():
  w = np.array([[0.5, 0.0, 0.3, 0.2, 0.0]])
  with np.errstate(divide="ignore"):
    got = plackett_luce_inclusion(np.log(w), 2)
  assert np.allclose(got[0], _brute_force_inclusion(w[0], 2), atol=1e-9)
  assert got[0, 1] == 0 and got[0, 4] == 0


def test_calibration_reaches_the_target():
  rng = np.random.default_rng(0)
  e, k = 16, 4
  p = rng.dirichlet(np.full(e, 0.7), size=6)
  target = np.minimum(k * p, 0.97)  # cap, then spread the excess so rows still sum to k
  for row in target:
    free = row < 0.97
    row[free] += (k - row.sum()) * row[free] / row[free].sum()
  assert np.all(target < 1) and np.allclose(target.sum(-1), k)
  log_w = calibrate_inclusion(target, k)
  assert np.abs(plackett_luce_inclusion(log_w, k) - target).max() < 1e-6
  naive = plackett_luce_inclusion(np.log(target), k)  # uncalibrated weights saturate
  assert np.abs(naive - target).max() > 0.02


def test_gumbel_top_k_distinct_and_frequencies():
  rng = np.random.default_rng(1)
  log_w = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
  ids = gumbel_top_k(np.broadcast_to(log_w, (40000, 5)), 2, rng)
  assert ids.shape == (40000, 2) and ids.dtype == np.int32
  assert np.all(ids[:, 0] != ids[:, 1])
  freq = np.bincount(ids.ravel(), minlength=5) / 40000
  ref = plackett_luce_inclusion(log_w[None], 2)[0]
  assert np.all(np.abs(freq - ref) < 5 * np.sqrt(ref * (1 - ref) / 40000))
  first = np.bincount(ids[:, 0], minlength=5) / 40000  # rank 0 = first draw ~ w
  assert np.all(np.abs(first - np.exp(log_w)) < 5 * np.sqrt(0.25 / 40000))


def test_gumbel_top_k_never_draws_zero_weight():
  log_w = np.array([np.log(0.5), -np.inf, np.log(0.5), -np.inf])
  ids = gumbel_top_k(np.broadcast_to(log_w, (5000, 4)), 2, np.random.default_rng(2))
  assert set(np.unique(ids).tolist()) == {0, 2}


@pytest.mark.parametrize("target,k,match", [
    (np.array([[1.0, 0.5, 0.5]]), 2, r"\[0, 1\)"),
    (np.array([[0.5, 0.5, 0.5]]), 2, "sum to k"),
    (np.array([0.5, 0.5]), 1, r"\[B, E\]"),
])
def test_calibration_errors(target, k, match):
  with pytest.raises(SamplingError, match=match):
    calibrate_inclusion(target, k)


def test_gumbel_top_k_needs_k_positive_weights():
  log_w = np.array([[0.0, -np.inf, -np.inf]])
  with pytest.raises(SamplingError, match="fewer than k=2"):
    gumbel_top_k(log_w, 2, np.random.default_rng(0))

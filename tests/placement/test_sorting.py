"""The fast stable argsort equals numpy's stable argsort, ties and infinities included."""
import numpy as np
import pytest

from moe_edge.placement.sorting import stable_argsort_desc


@pytest.mark.parametrize("kind", ["continuous", "ties", "all_equal", "infinite"])
@pytest.mark.parametrize("shape", [(7,), (5, 33), (3, 4, 20)])
def test_equals_numpy_stable(kind, shape):
  rng = np.random.default_rng(0)
  x = {"continuous": rng.random(shape),
       "ties": rng.integers(0, 4, shape).astype(float),
       "all_equal": np.zeros(shape),
       "infinite": np.where(rng.random(shape) < 0.3, -np.inf, rng.integers(0, 3, shape))}[kind]
  np.testing.assert_array_equal(stable_argsort_desc(x), np.argsort(-x, axis=-1, kind="stable"))


def test_rejects_nan():
  with pytest.raises(ValueError, match="NaN"):
    stable_argsort_desc(np.array([1.0, np.nan]))

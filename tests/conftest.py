"""Test set-up: 8 host CPU devices (set before JAX initialises) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """``../shared/data`` (real corpus and routing statistics); the tests need it."""
  assert SHARED_DATA.is_dir(), f"expected the shared data at {SHARED_DATA}"
  return SHARED_DATA

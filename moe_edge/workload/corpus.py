"""The real five-domain text corpus as byte tokens, split into train and held-out parts.

The text lives in ``data_dir()/corpus/<domain>.txt`` (see ``../shared/data/README.md``): the
samples the OLMoE paper used for its routing analysis, one file per domain. Tokens are UTF-8 bytes
(:class:`moe_edge.workload.tokenizer.ByteTokenizer`).

Split: the held-out part of a domain is the last ``heldout_fraction`` of its file, the train part
everything before. The cut is moved to the nearest line break within :data:`CUT_WINDOW` bytes of
the nominal position (the files hold one document or paragraph per line, so this cuts between
documents, not inside one); the line break stays with the train part. With no line break nearby
the cut stays put, moved back to a UTF-8 character boundary. Train and held-out are disjoint and
together are the whole file, byte for byte.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_edge.core.errors import MoeEdgeError

DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")
SPLITS = ("train", "heldout")
CUT_WINDOW = 4096  # bytes searched on each side of the nominal cut for a line break


class CorpusError(MoeEdgeError):
  """The corpus is missing or a request for it is malformed."""


def repo_root() -> Path:
  """The moe-edge repository (the folder holding ``moe_edge/``)."""
  return Path(__file__).resolve().parents[2]


def data_dir() -> Path:
  """The shared data folder: ``$MOE_EDGE_DATA``, else ``<repo>/../shared/data``.

  Raises CorpusError naming the path and the fix when the folder does not exist.
  """
  env = os.environ.get("MOE_EDGE_DATA")
  path = Path(env).expanduser() if env else repo_root().parent / "shared" / "data"
  if not path.is_dir():
    how = "the MOE_EDGE_DATA environment variable points" if env else "the default location is"
    raise CorpusError(
        f"moe-edge data folder not found: {how} {path}. It must hold corpus/<domain>.txt and "
        f"routing_stats/*.npz (see third_party/olmoe_routing_and_corpus/README.md). Put the "
        f"shared data there, or set MOE_EDGE_DATA=/path/to/shared/data.")
  return path


def domain_id(name: str) -> int:
  """Index of a domain in :data:`DOMAINS`; unknown names raise CorpusError listing the known."""
  if name not in DOMAINS:
    raise CorpusError(f"unknown domain {name!r}; the corpus has {', '.join(DOMAINS)}.")
  return DOMAINS.index(name)


@functools.lru_cache(maxsize=None)
def _read_bytes(path: str) -> bytes:
  p = Path(path)
  if not p.is_file():
    raise CorpusError(f"corpus file {p} is missing; the data folder {p.parent.parent} must hold "
                      f"corpus/<domain>.txt for the domains {', '.join(DOMAINS)} (set "
                      f"MOE_EDGE_DATA to the folder that does).")
  return p.read_bytes()


def split_point(data: bytes, heldout_fraction: float) -> int:
  """Byte offset where the held-out part of ``data`` starts (see the module docstring)."""
  nominal = int(round(len(data) * (1.0 - heldout_fraction)))
  lo, hi = max(nominal - CUT_WINDOW, 1), min(nominal + CUT_WINDOW, len(data) - 1)
  before = data.rfind(b"\n", lo - 1, nominal)  # a break at b means held-out starts at b + 1
  after = data.find(b"\n", nominal, hi)
  candidates = [b + 1 for b in (before, after) if b >= 0]
  if candidates:
    return min(candidates, key=lambda c: (abs(c - nominal), c))
  cut = nominal
  while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:  # UTF-8 continuation byte
    cut -= 1
  return cut


def _check_fraction(heldout_fraction: float) -> None:
  if not 0.0 < heldout_fraction < 1.0:
    raise CorpusError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}; e.g. 0.05 "
                      f"keeps the last 5% of each domain for evaluation.")


@functools.lru_cache(maxsize=None)
def _domain_tokens(path: str, split: str, heldout_fraction: float) -> np.ndarray:
  data = _read_bytes(path)
  cut = split_point(data, heldout_fraction)
  part = data[:cut] if split == "train" else data[cut:]
  if not part:
    raise CorpusError(f"the {split} part of {path} is empty (heldout_fraction="
                      f"{heldout_fraction}, {len(data)} bytes); choose a fraction that leaves "
                      f"text on both sides.")
  tokens = np.frombuffer(part, dtype=np.uint8).astype(np.int32)
  tokens.setflags(write=False)  # shared by every caller through the cache
  return tokens


def load_corpus(split: str = "train", heldout_fraction: float = 0.05) -> dict[str, np.ndarray]:
  """Byte tokens of every domain: ``{domain: [S_d] int32}`` in :data:`DOMAINS` order.

  Args:
    split: ``"train"`` (the first ``1 - heldout_fraction`` of each file) or ``"heldout"``.
    heldout_fraction: share of each file kept for held-out use, in (0, 1).

  The arrays are read-only and cached: repeated calls cost nothing.
  """
  if split not in SPLITS:
    raise CorpusError(f"unknown split {split!r}; use one of {SPLITS}.")
  _check_fraction(heldout_fraction)
  folder = data_dir() / "corpus"
  return {d: _domain_tokens(str(folder / f"{d}.txt"), split, float(heldout_fraction))
          for d in DOMAINS}


def sample_batch(tokens_by_domain: dict[str, np.ndarray], rng: np.random.Generator, batch: int,
                 seq_len: int, domains: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Random windows of the corpus, balanced over domains.

  Args:
    tokens_by_domain: ``{domain: [S_d] int}``, e.g. from :func:`load_corpus`.
    rng: the random generator (the only source of randomness).
    batch: ``B`` windows.
    seq_len: model input length; each window has ``seq_len + 1`` tokens (inputs and targets).
    domains: the domains to draw from (default: every key of ``tokens_by_domain``).

  Returns:
    ``tokens [B, seq_len + 1] int32`` and ``domain_ids [B] int32`` (index into
    :data:`DOMAINS`). Each domain gets ``B // D`` or ``B // D + 1`` windows (which domains get
    the extra one is random), in random order; each window starts uniformly at random.
  """
  if batch <= 0 or seq_len <= 0:
    raise CorpusError(f"batch and seq_len must be positive, got batch={batch}, "
                      f"seq_len={seq_len}.")
  names = list(tokens_by_domain) if domains is None else list(domains)
  if not names:
    raise CorpusError("sample_batch needs at least one domain.")
  ids = np.array([domain_id(n) for n in names], dtype=np.int32)
  for n in names:
    if n not in tokens_by_domain:
      raise CorpusError(f"domain {n!r} is not in tokens_by_domain (it has "
                        f"{', '.join(tokens_by_domain)}).")
    if len(tokens_by_domain[n]) < seq_len + 1:
      raise CorpusError(f"domain {n!r} has {len(tokens_by_domain[n])} tokens, fewer than one "
                        f"window of seq_len + 1 = {seq_len + 1}; use a shorter seq_len.")
  pick = rng.permutation(np.resize(rng.permutation(len(names)), batch))  # [B] index into names
  span = np.arange(seq_len + 1)
  out = np.empty((batch, seq_len + 1), dtype=np.int32)
  for j, n in enumerate(names):
    rows = np.flatnonzero(pick == j)
    if rows.size:
      arr = tokens_by_domain[n]
      starts = rng.integers(0, len(arr) - seq_len, size=rows.size)
      out[rows] = np.asarray(arr)[starts[:, None] + span]
  return out, ids[pick]

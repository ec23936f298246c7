"""Corpus loading, the train/held-out split and balanced batches, against the raw files."""
import numpy as np
import pytest

from moe_edge.workload import corpus
from moe_edge.workload.corpus import (CUT_WINDOW, DOMAINS, CorpusError, data_dir, load_corpus,
                                      sample_batch, split_point)


def test_data_dir_default_and_override(shared_data, monkeypatch, tmp_path):
  monkeypatch.delenv("MOE_EDGE_DATA", raising=False)
  assert data_dir().resolve() == shared_data.resolve()
  monkeypatch.setenv("MOE_EDGE_DATA", str(tmp_path))
  assert data_dir() == tmp_path
  missing = tmp_path / "nope"
  monkeypatch.setenv("MOE_EDGE_DATA", str(missing))
  with pytest.raises(CorpusError, match="MOE_EDGE_DATA") as err:
    data_dir()
  assert str(missing) in str(err.value)


def test_missing_domain_file_is_named(monkeypatch, tmp_path):
  (tmp_path / "corpus").mkdir()
  monkeypatch.setenv("MOE_EDGE_DATA", str(tmp_path))
  with pytest.raises(CorpusError, match="arxiv.txt"):
    load_corpus("train")


def test_split_is_disjoint_complete_and_at_a_line_break(shared_data):
  train, held = load_corpus("train"), load_corpus("heldout")
  assert tuple(train) == DOMAINS == tuple(held)
  for d in DOMAINS:
    raw = (shared_data / "corpus" / f"{d}.txt").read_bytes()
    both = np.concatenate([train[d], held[d]])
    assert both.dtype == np.int32
    assert np.array_equal(both, np.frombuffer(raw, np.uint8))
    assert train[d][-1] == ord("\n")  # the cut follows a line break
    nominal = len(raw) * 0.95
    assert abs(len(train[d]) - nominal) <= CUT_WINDOW + 1


def test_heldout_fraction_changes_the_split():
  small = load_corpus("heldout", heldout_fraction=0.02)
  big = load_corpus("heldout", heldout_fraction=0.2)
  for d in DOMAINS:
    assert len(big[d]) > 5 * len(small[d])
    assert np.array_equal(big[d][-len(small[d]):], small[d])  # both are suffixes of the file


def test_cache_returns_the_same_read_only_arrays():
  a, b = load_corpus(), load_corpus()
  assert all(a[d] is b[d] for d in DOMAINS)
  with pytest.raises(ValueError):
    a["c4"][0] = 1


@pytest.mark.parametrize("split,frac", [("test", 0.05), ("train", 0.0), ("heldout", 1.0)])
def test_bad_split_arguments(split, frac):
  with pytest.raises(CorpusError):
    load_corpus(split, heldout_fraction=frac)


def test_split_point_without_line_break_keeps_utf8_characters():
  data = ("é" * 3000).encode()  # 6000 bytes, no newline, every other byte a continuation byte
  for frac in (0.1, 0.33, 0.5001):
    cut = split_point(data, frac)
    assert 0 <= round(len(data) * (1 - frac)) - cut <= 3  # moved back to a character start
    data[:cut].decode("utf-8")  # would raise on a broken character
    data[cut:].decode("utf-8")


def test_split_point_picks_the_nearest_line_break():
  data = b"a" * 1000 + b"\n" + b"b" * 1000 + b"\n" + b"c" * 500
  nominal = round(len(data) * (1 - 0.3))
  cut = split_point(data, 0.3)
  breaks = [i + 1 for i, c in enumerate(data) if c == ord("\n")]
  assert cut == min(breaks, key=lambda b: abs(b - nominal))


def _numbered(lengths):
  """Domain d's tokens are 1000 * d + 0, 1, 2, ...: windows reveal domain and start."""
  return {d: (1000 * corpus.DOMAINS.index(d) + np.arange(n)).astype(np.int32)
          for d, n in lengths.items()}


def test_sample_batch_windows_and_balance():
  toks = _numbered({d: 200 + 10 * i for i, d in enumerate(DOMAINS)})
  rng = np.random.default_rng(0)
  batch, ids = sample_batch(toks, rng, batch=13, seq_len=31)
  assert batch.shape == (13, 32) and batch.dtype == np.int32
  assert ids.shape == (13,) and ids.dtype == np.int32
  assert np.all(np.diff(batch, axis=1) == 1)  # contiguous windows
  assert np.array_equal(batch[:, 0] // 1000, ids)  # the window comes from the labelled domain
  for row, d in zip(batch, ids):
    assert row[-1] - 1000 * d < len(toks[DOMAINS[d]])  # inside the text
  per = np.bincount(ids, minlength=5)
  assert per.max() - per.min() <= 1


def test_sample_batch_domain_subset_and_determinism():
  toks = _numbered({d: 100 for d in DOMAINS})
  a = sample_batch(toks, np.random.default_rng(7), 8, 10, domains=["github", "book"])
  b = sample_batch(toks, np.random.default_rng(7), 8, 10, domains=["github", "book"])
  c = sample_batch(toks, np.random.default_rng(8), 8, 10, domains=["github", "book"])
  assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert sorted(set(a[1].tolist())) == [DOMAINS.index("book"), DOMAINS.index("github")]
  assert np.bincount(a[1], minlength=5).max() == 4


def test_sample_batch_real_corpus_decodes():
  batch, ids = sample_batch(load_corpus(), np.random.default_rng(1), 10, 64)
  assert batch.shape == (10, 65) and batch.max() < 256 and set(ids.tolist()) == set(range(5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(domains=["poetry"]), "unknown domain"),
    (dict(seq_len=100), "fewer than one window"),
    (dict(batch=0), "positive"),
])
def test_sample_batch_errors(kwargs, match):
  toks = _numbered({"arxiv": 50, "book": 50})
  args = dict(batch=4, seq_len=8)
  args.update(kwargs)
  with pytest.raises(CorpusError, match=match):
    sample_batch(toks, np.random.default_rng(0), **args)
  with pytest.raises(CorpusError, match="not in tokens_by_domain"):
    sample_batch(toks, np.random.default_rng(0), 4, 8, domains=["c4"])

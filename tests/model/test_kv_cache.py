"""KV-cache decoding equals the cache-free model: logits at every position (float32, tight
tolerance) and greedy tokens, with ragged prompt lengths, chunked prefill, for the tiny model and
the shipped small_moe; one compiled decode step serves every position."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_edge.config import model_config
from moe_edge.model.checkpoint import restore_checkpoint
from moe_edge.model.decoding import generate_cached
from moe_edge.model.kv_cache import CacheError, KVCache
from moe_edge.model.transformer import ModelError, MoETransformer
from moe_edge.workload import corpus
from conftest import REPO


@pytest.fixture(scope="module", params=["tiny", "small_moe"])
def model(request):
  if request.param == "tiny":  # an "rbg" key: the initialisers compile much faster on CPU
    return MoETransformer(model_config("tiny"), nnx.Rngs(jax.random.key(0, impl="rbg")))
  return restore_checkpoint(REPO / "checkpoints" / "small_moe" / "final", "small_moe")[0]


@nnx.jit
def _forward(model, tokens):
  return model(tokens)[0]


@nnx.jit
def _step(model, tokens, num_new, cache):
  logits, _, cache = model.step(tokens, cache, num_new)
  return logits, cache


def _prompts(n_tokens, seed=0):
  text = corpus.load_corpus("heldout")["wikipedia"]
  rng = np.random.default_rng(seed)
  return [np.asarray(text[s:s + n], np.int32)
          for s, n in zip(rng.integers(0, len(text) - 64, len(n_tokens)), n_tokens)]


def test_cached_logits_equal_uncached_at_every_position(model):
  """Ragged rows fed in chunks of 5 (a row may feed fewer than 5, or nothing, in a step)."""
  lens = [13, 7, 1]
  prompts = _prompts(lens)
  width = 15
  cache = KVCache.init(model.cfg, len(lens))
  got = [np.zeros((n, model.cfg.vocab_size), np.float32) for n in lens]
  buf = np.zeros((len(lens), width), np.int32)
  for i, p in enumerate(prompts):
    buf[i, :p.size] = p
  for start in range(0, width, 5):
    num_new = np.clip(np.array(lens) - start, 0, 5).astype(np.int32)
    logits, cache = _step(model, jnp.asarray(buf[:, start:start + 5]), jnp.asarray(num_new),
                          cache)
    for i, k in enumerate(num_new):
      got[i][start:start + k] = np.asarray(logits[i, :k])
  np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
  full = np.asarray(_forward(model, jnp.asarray(buf)))  # causal: padding after a row is unseen
  for i, n in enumerate(lens):
    want = full[i, :n]
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cached_greedy_generation_equals_uncached(model):
  """Every generated token is the uncached model's argmax after the prompt and the tokens
  before it (what uncached greedy generation produces), checked in one uncached forward."""
  lens, new = [9, 4, 12], 10
  prompts = _prompts(lens, seed=1)
  got = generate_cached(model, prompts, new, prefill_chunk=5)
  seqs = np.zeros((len(lens), max(lens) + new), np.int32)
  for i, p in enumerate(prompts):
    seqs[i, :p.size], seqs[i, p.size:p.size + new] = p, got[i]
  argmax = np.asarray(_forward(model, jnp.asarray(seqs))).argmax(-1)
  for i, n in enumerate(lens):
    np.testing.assert_array_equal(got[i], argmax[i, n - 1:n - 1 + new])


def test_decode_step_compiles_once_as_contexts_grow():
  model = MoETransformer(model_config("tiny"), nnx.Rngs(jax.random.key(1, impl="rbg")))
  traces = []

  @nnx.jit
  def step(model, tokens, cache):
    traces.append(1)
    return model.step(tokens, cache)[2]

  cache = KVCache.init(model.cfg, 2)
  for _ in range(20):
    cache = step(model, jnp.ones((2, 1), jnp.int32), cache)
  assert len(traces) == 1 and np.asarray(cache.lengths).tolist() == [20, 20]


def test_bad_inputs_are_refused_with_the_fix():
  model = MoETransformer(model_config("tiny"), nnx.Rngs(jax.random.key(2, impl="rbg")))
  with pytest.raises(ModelError, match="exceeds max_seq_len"):
    generate_cached(model, [np.zeros(60, np.int32)], 5)
  with pytest.raises(ModelError, match="max_new must be >= 1"):
    generate_cached(model, [np.zeros(3, np.int32)], 0)
  with pytest.raises(CacheError, match="B=3 rows"):
    model.step(jnp.zeros((3, 1), jnp.int32), KVCache.init(model.cfg, 2))
  with pytest.raises(CacheError, match="capacity"):
    KVCache.init(model.cfg, 1, capacity=model.cfg.max_seq_len + 1)

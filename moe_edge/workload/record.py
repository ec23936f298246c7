"""Record an :class:`~moe_edge.workload.traces.ActivationTrace` by running a Flax MoE model over
request streams (:func:`moe_edge.workload.streams.make_streams`).

Requests of equal length are batched (``batch_size`` rows, the last batch padded by repeating its
first row; padded rows are discarded) through one jitted forward per distinct length. Each
request is a full sequence (prefill): every token's routing is recorded at every MoE layer, with
the gate weights the model used.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_edge.config import ModelConfig, model_config
from moe_edge.workload.streams import Request
from moe_edge.workload.traces import ActivationTrace, TraceError


def _check_requests(requests: Sequence[Request], cfg: ModelConfig, num_servers: int) -> None:
  if not requests:
    raise TraceError("record_trace needs at least one request; build them with make_streams.")
  ids = [r.request_id for r in requests]
  if len(set(ids)) != len(ids):
    raise TraceError("request ids must be unique across servers (make_streams numbers them).")
  for r in requests:
    tok = np.asarray(r.tokens)
    if not 0 <= r.server < num_servers:
      raise TraceError(f"request {r.request_id} is for server {r.server}, outside "
                       f"[0, {num_servers}); pass the number of servers the streams were made for.")
    if tok.ndim != 1 or tok.size == 0 or not np.issubdtype(tok.dtype, np.integer):
      raise TraceError(f"request {r.request_id}: tokens must be a non-empty [S] integer array, "
                       f"got shape {tok.shape} dtype {tok.dtype}.")
    if tok.min() < 0 or tok.max() >= cfg.vocab_size:
      raise TraceError(f"request {r.request_id}: token ids in [{tok.min()}, {tok.max()}] do not "
                       f"fit model {cfg.name!r} with vocab_size {cfg.vocab_size}.")
    if tok.size > cfg.max_seq_len:
      raise TraceError(f"request {r.request_id} has {tok.size} tokens but model {cfg.name!r} "
                       f"takes at most max_seq_len={cfg.max_seq_len}; make shorter requests.")


def record_trace(model, cfg: ModelConfig | str, requests: Sequence[Request], num_servers: int,
                 batch_size: int, source: str = "corpus", note: str = "") -> ActivationTrace:
  """Run ``model`` over ``requests`` and return the routing it chose.

  Args:
    model: an ``moe_edge.model.transformer.MoETransformer`` (``logits, aux = model(tokens)``
      with ``aux["expert_ids"], aux["gates"]`` of shape ``[B, S, L, k]``).
    cfg: its config (or preset name); ``cfg.name`` goes into the trace metadata.
    requests: the requests (any lengths up to ``cfg.max_seq_len``).
    num_servers: ``N`` of the streams.
    batch_size: rows per forward pass.
    source, note: trace metadata.

  Returns:
    ActivationTrace with one row per request token, ordered by (step, server, request id,
    position); ``server``, ``request`` and ``step`` come from the requests.
  """
  cfg = model_config(cfg)
  if batch_size <= 0:
    raise TraceError(f"batch_size must be positive, got {batch_size}.")
  _check_requests(requests, cfg, num_servers)
  graphdef, state = nnx.split(model)

  @jax.jit
  def route(state, tokens):
    _, aux = nnx.merge(graphdef, state)(tokens)
    return aux["expert_ids"], aux["gates"]

  l, k = cfg.n_moe_layers, cfg.top_k
  order = sorted(requests, key=lambda r: (r.step, r.server, r.request_id))
  by_len: dict[int, list[int]] = {}
  for i, r in enumerate(order):
    by_len.setdefault(len(r.tokens), []).append(i)
  rows = min(batch_size, len(order))
  ids_of: list = [None] * len(order)
  gates_of: list = [None] * len(order)
  for s, members in by_len.items():
    for lo in range(0, len(members), rows):
      chunk = members[lo:lo + rows]
      toks = np.stack([order[i].tokens for i in chunk]).astype(np.int32)
      if len(chunk) < rows:  # pad with copies of the first row; their outputs are dropped
        toks = np.concatenate([toks, np.repeat(toks[:1], rows - len(chunk), axis=0)])
      ids, gates = route(state, jnp.asarray(toks))
      ids, gates = np.asarray(ids), np.asarray(gates, dtype=np.float32)
      if ids.shape != (rows, s, l, k) or gates.shape != ids.shape:
        raise TraceError(f"model returned routing of shape {ids.shape} / {gates.shape}; config "
                         f"{cfg.name!r} implies [B, S, L, k] = {(rows, s, l, k)}. Is cfg the "
                         f"model's own config?")
      for j, i in enumerate(chunk):
        ids_of[i], gates_of[i] = ids[j], gates[j]
  lengths = np.array([len(r.tokens) for r in order])
  rep = lambda key: np.repeat(np.array([getattr(r, key) for r in order]), lengths)
  position = np.concatenate([np.arange(n) for n in lengths])
  return ActivationTrace(
      expert_ids=np.concatenate(ids_of).astype(np.int32),
      gate_weights=np.concatenate(gates_of).astype(np.float32),
      server=rep("server").astype(np.int32), request=rep("request_id").astype(np.int32),
      position=position.astype(np.int32), step=rep("step").astype(np.int32), model=cfg.name,
      num_experts=cfg.n_experts, num_servers=num_servers, source=source, note=note)

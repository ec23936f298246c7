"""The serving engine: the scheduler's steps run for real on the placed, distributed model.

Every server is one device of the ``server`` mesh. It holds the model's dense weights (a
replica), only its own expert slots, and the KV caches of its ``max_batch`` slots (rows
``n * R .. n * R + R - 1`` of one ``[N * R, T, H_kv, D]`` array per layer and K/V, sharded by
rows over ``server``). A cluster step is one jitted program: every server feeds its planned
tokens (prompt chunks and decodes, padded to a chunk width ``C`` of 1 or ``prefill_chunk``),
attention reads and writes the server's own caches, and every MoE layer runs the
placement-driven dispatch of :mod:`moe_edge.parallel.dispatch` (padded tokens are masked out
and send nothing). Greedy decoding. The program compiles once per chunk width: tables, slot
weights, positions and caches are arguments.

Where the placed weights live: a :class:`moe_edge.parallel.runtime.ServingRuntime` holds the
slot arrays and the slot/route tables, and does live migration (``prepare_placement`` /
``commit`` / ``apply_placement``) and the failure drill (``fail_server``); the engine reads its
current tables and slots at every step, so a migration or a failure committed between steps
(``between_steps`` of :meth:`Engine.serve`) takes effect at the next step. The engine does not
use the runtime's cache-free forward.

Clocks: ``"wall"`` (measured step times; arrivals wait in real time) or ``"virtual"`` (each
step takes the cost model's time for its actual routing, :class:`~moe_edge.serving.step_cost.
StepCost`; the simulator's equality test runs this). Per step the engine also records the
routing of every fed token, so the simulator can replay it.

Several processes (``jax.distributed``): every process runs the same engine on the same
requests (the scheduler is deterministic); each copies only its own devices' rows, and the next
tokens and the routing come back replicated, so every process knows every request's tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_edge.model.decoding import last_logits
from moe_edge.model.kv_cache import KVCache, new_positions
from moe_edge.model.transformer import MoETransformer
from moe_edge.parallel import dispatch as dispatch_lib
from moe_edge.parallel.mesh import WEIGHT_NAMES, row_sharding, shard_rows, tables_on_mesh
from moe_edge.parallel.runtime import ServingRuntime, UnreachableExpertError
from moe_edge.serving import loop as loop_lib
from moe_edge.serving import scheduler as sched
from moe_edge.serving.step_cost import StepCost
from moe_edge.workload.requests import Requests

CLOCKS = ("wall", "virtual")


class EngineError(sched.SchedulerError):
  """The engine cannot serve this workload on this runtime (clock, cost model, shapes)."""


@dataclasses.dataclass(frozen=True)
class StepRouting:
  """The tokens one step fed: ``request [T]``, ``position [T]``, ``server [T]`` and their
  ``expert_ids [T, L, k]`` (row order: server, slot, chunk position)."""
  request: np.ndarray
  position: np.ndarray
  server: np.ndarray
  expert_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class EngineResult:
  """A served workload: the loop's records, every request's generated tokens, and per step
  the routing, the bytes the dispatch moved and the cost model's bytes for that routing."""
  loop: loop_lib.LoopResult
  tokens: tuple[np.ndarray, ...]
  routing: tuple[StepRouting, ...]
  dispatch_bytes: tuple[int, ...]
  cost_bytes: tuple[int, ...]


def _is_routed_expert(path, x) -> bool:
  """nnx filter: the ``[E, d, f]`` / ``[E, f, d]`` routed-expert weights of MoE blocks."""
  return bool(path) and path[-1] in WEIGHT_NAMES and len(x.shape) == 3


def _replicate(tree, mesh: Mesh):
  sharding = NamedSharding(mesh, P())

  def one(a):
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(one, tree)


def _host(a: jax.Array) -> np.ndarray:
  """Host copy of a replicated array (under ``jax.distributed`` too)."""
  return np.asarray(a.addressable_data(0))


@functools.lru_cache(maxsize=8)
def _program(graphdef, experts_treedef, experts_leaves: tuple, mesh: Mesh, transport: str):
  """The jitted cluster step of one model structure on one mesh (shared by engines)."""
  layer_fn = dispatch_lib.layer_program(mesh, transport, None)
  abstract = jax.tree_util.tree_unflatten(
      experts_treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in experts_leaves])
  replicated = NamedSharding(mesh, P())

  def step(dense, slots, route, dest_slot, cache, tokens, num_new, lengths):
    """``tokens [N*R, C]``, ``num_new, lengths [N*R]`` -> next tokens ``[N*R]``, expert ids
    ``[N*R, C, L, k]`` (both replicated), dispatched rows ``[L, N, N]``, the new cache."""
    experts = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    model = nnx.merge(graphdef, experts, dense)
    b, c = tokens.shape
    cache = KVCache(cache.layers, lengths)
    _, valid = new_positions(lengths, num_new, c)
    mask = valid.reshape(b * c)
    sent = []

    def moe_fn(layer, x, ids, gates, *unused):
      d, k = x.shape[-1], ids.shape[-1]
      w = slots[layer]
      y, st = layer_fn(x.reshape(b * c, d), ids.reshape(b * c, k).astype(jnp.int32),
                       gates.reshape(b * c, k), mask, route[:, layer], dest_slot[:, layer],
                       w["w_gate_up"], w["w_down"])
      sent.append(st.send_rows)
      return y.reshape(b, c, d)

    logits, aux, cache = model.step(tokens, cache, num_new, moe_fn=moe_fn)
    nxt = jnp.argmax(last_logits(logits, num_new), axis=-1).astype(jnp.int32)
    nxt = jax.lax.with_sharding_constraint(nxt, replicated)
    ids = jax.lax.with_sharding_constraint(aux["expert_ids"], replicated)
    return nxt, ids, jnp.stack(sent), cache

  return jax.jit(step, donate_argnums=(4,))


class Engine:
  """Serve request workloads on a :class:`ServingRuntime`'s placed experts (module docstring).

  Args:
    runtime: holds the slot weights and tables (and migrates / fails over).
    model: the model ``runtime`` was built from (its dense weights are served).
    options: scheduler options; ``options.max_batch`` is the KV-cache slots per server.
    cost: the cost model of steps (needed for the virtual clock; with it the engine also
      reports the cost model's bytes for every step).
  """

  def __init__(self, runtime: ServingRuntime, model: MoETransformer,
               options: sched.SchedulerOptions, cost: StepCost | None = None):
    if model.cfg != runtime.cfg:
      raise EngineError(f"the model is {model.cfg.name!r} but the runtime serves "
                        f"{runtime.cfg.name!r}; build both from the same model.")
    self.runtime, self.cfg, self.options, self.cost = runtime, model.cfg, options, cost
    self.mesh = runtime.mesh
    self.num_servers = runtime.num_servers
    graphdef, experts, dense = nnx.split(model, _is_routed_expert, ...)
    leaves, treedef = jax.tree_util.tree_flatten(experts)
    self._program = _program(graphdef, treedef,
                             tuple((tuple(a.shape), np.dtype(a.dtype)) for a in leaves),
                             self.mesh, runtime.transport)
    self._dense = _replicate(dense, self.mesh)
    rows = self.num_servers * options.max_batch
    init = jax.jit(lambda: KVCache.init(self.cfg, rows, dtype=model.dtype),
                   out_shardings=row_sharding(self.mesh))
    self._cache = init()
    self._tables_key, self._tables_dev = None, None

  def _device_tables(self):
    tables = self.runtime.tables
    if self._tables_key is not tables:
      self._tables_key, self._tables_dev = tables, tables_on_mesh(tables, self.mesh)
    return self._tables_dev

  def compile(self) -> None:
    """Compile (and run once, feeding nothing) the step program of both chunk widths, so
    wall-clock times of a following :meth:`serve` do not include compilation."""
    rows = self.num_servers * self.options.max_batch
    zeros = np.zeros(rows, np.int32)
    for c in sorted({1, self.options.prefill_chunk}):
      tables = self._device_tables()
      out = self._program(self._dense, self.runtime.slot_weights(), tables["route"],
                          tables["dest_slot"], self._cache,
                          shard_rows(np.zeros((rows, c), np.int32), self.mesh),
                          shard_rows(zeros, self.mesh), shard_rows(zeros, self.mesh))
      self._cache = out[3]
    jax.block_until_ready(self._cache)

  def width(self, steps: tuple[sched.ServerStep, ...]) -> int:
    """Chunk width of a step: 1 for decodes only, else ``prefill_chunk`` (two programs)."""
    return self.options.prefill_chunk if any(s.prefill for s in steps) else 1

  def serve(self, requests: Requests, clock: str = "wall",
            between_steps: Callable[[int, float], None] | None = None,
            on_step: Callable[[int, int], None] | None = None) -> EngineResult:
    """Serve ``requests`` to completion.

    Args:
      requests: the workload (sorted by arrival; token ids within the vocabulary).
      clock: ``"wall"`` or ``"virtual"`` (needs ``cost``).
      between_steps: called with ``(steps done, now)`` before each step, e.g. to migrate.
      on_step: called with ``(step index, tokens it produced)`` after each step (progress).
    """
    if clock not in CLOCKS:
      raise EngineError(f"unknown clock {clock!r}; use one of {CLOCKS}.")
    if clock == "virtual" and self.cost is None:
      raise EngineError("the virtual clock needs a cost model: Engine(..., cost=StepCost(...)).")
    for i, p in enumerate(requests.prompts):
      if p.min() < 0 or p.max() >= self.cfg.vocab_size:
        raise EngineError(f"request {i} has token ids in [{p.min()}, {p.max()}] but model "
                          f"{self.cfg.name!r} has vocab_size {self.cfg.vocab_size}.")
    out: list[list[int]] = [[] for _ in range(len(requests))]
    routing, sent, costed = [], [], []

    def execute(index: int, steps: tuple[sched.ServerStep, ...]) -> loop_lib.StepOutcome:
      step_routing, nbytes, produced = self._step(requests, out, steps)
      routing.append(step_routing)
      sent.append(nbytes)
      seconds = 0.0
      if self.cost is not None:
        seconds, model_bytes = self.cost.step(step_routing.expert_ids, step_routing.server,
                                              self.runtime.placement, step_routing.request,
                                              step_routing.position)
        costed.append(model_bytes)
      if on_step is not None:
        on_step(index, produced)
      return loop_lib.StepOutcome(seconds, nbytes)

    clk = loop_lib.VirtualClock() if clock == "virtual" else loop_lib.WallClock()
    res = loop_lib.run_loop(requests, self.num_servers, self.options, self.cfg.max_seq_len,
                            execute, clk, between_steps=between_steps)
    return EngineResult(res, tuple(np.array(o, np.int32) for o in out), tuple(routing),
                        tuple(sent), tuple(costed))

  def _batch(self, requests: Requests, out: list[list[int]],
             steps: tuple[sched.ServerStep, ...]):
    """Host inputs of one step: ``tokens [N*R, C]``, ``num_new, lengths [N*R]`` and the fed
    rows ``(row, request, first position, count, yields a token)``."""
    for n in self.runtime.failed_servers:
      if steps[n].tokens:
        raise EngineError(f"server {n} has failed but has requests to serve; send them to a "
                          f"surviving server (Requests.server) before failing it.")
    r_slots = self.options.max_batch
    rows = self.num_servers * r_slots
    tokens = np.zeros((rows, self.width(steps)), np.int32)
    num_new = np.zeros(rows, np.int32)
    lengths = np.zeros(rows, np.int32)
    fed = []
    for n, s in enumerate(steps):
      for ch in s.prefill:
        row = n * r_slots + ch.slot
        tokens[row, :ch.length] = requests.prompts[ch.request][ch.start:ch.start + ch.length]
        num_new[row], lengths[row] = ch.length, ch.start
        last = ch.start + ch.length == len(requests.prompts[ch.request])
        fed.append((row, ch.request, ch.start, ch.length, last))
      for d in s.decode:
        row = n * r_slots + d.slot
        tokens[row, 0] = out[d.request][-1]
        num_new[row], lengths[row] = 1, d.position
        fed.append((row, d.request, d.position, 1, True))
    return tokens, num_new, lengths, fed

  def _step(self, requests: Requests, out: list[list[int]],
            steps: tuple[sched.ServerStep, ...]) -> tuple[StepRouting, int, int]:
    """Run one planned step on the mesh; append the new tokens to ``out``. Returns the step's
    routing, the bytes the dispatch moved (dispatch plus combine) and the tokens produced."""
    tokens, num_new, lengths, fed = self._batch(requests, out, steps)
    tables = self._device_tables()
    nxt, ids, send, self._cache = self._program(
        self._dense, self.runtime.slot_weights(), tables["route"], tables["dest_slot"],
        self._cache, shard_rows(tokens, self.mesh), shard_rows(num_new, self.mesh),
        shard_rows(lengths, self.mesh))
    nxt, ids, send = _host(nxt), _host(ids), _host(send).astype(np.int64)
    self._check_reachable(send)
    r_slots = self.options.max_batch
    rec = [(req, pos + j, row // r_slots, row, j)
           for row, req, pos, cnt, _ in fed for j in range(cnt)]
    produced = 0
    for row, req, _, _, yields in fed:
      if yields:
        out[req].append(int(nxt[row]))
        produced += 1
    rec_a = np.array(rec, np.int64).reshape(-1, 5)
    routing = StepRouting(rec_a[:, 0].astype(np.int32), rec_a[:, 1].astype(np.int32),
                          rec_a[:, 2].astype(np.int32),
                          ids[rec_a[:, 3], rec_a[:, 4]].astype(np.int32))
    return routing, 2 * int(send.sum()) * self.cfg.activation_bytes, produced

  def _check_reachable(self, send_rows: np.ndarray) -> None:
    dead = list(self.runtime.failed_servers)
    if dead and int(send_rows[..., dead].sum()):
      raise UnreachableExpertError(
          f"{int(send_rows[..., dead].sum())} token-choice(s) picked experts held only by "
          f"failed server(s) {dead}; call runtime.recover() between steps to re-load them.")


__all__ = ["CLOCKS", "Engine", "EngineError", "EngineResult", "StepRouting"]

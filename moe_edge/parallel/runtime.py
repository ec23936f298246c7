"""Serving runtime: a placed MoE model on a ``server`` mesh, live migration and failover.

Three modules, one seam each: this one (the serving loop and the runtime object),
:mod:`moe_edge.parallel.weights` (slot weights and the live-migration copy program) and
:mod:`moe_edge.parallel.failover` (the fallback when a server is lost).

:class:`ServingRuntime` keeps, per device (= server), the model's dense weights (replicated) and
only that server's expert slots (one ``[N, S, ...]`` array per MoE layer, sharded over
``server``), plus the placement's route and slot tables on device. Requests of each server are
served on that server's device; every MoE layer runs the placement-driven dispatch of
:mod:`moe_edge.parallel.dispatch`.

Serving
-------
* :meth:`ServingRuntime.step` runs one forward pass over every server's batch (``[R_n, S]``
  token ids per server; servers may have different ``R_n``, padded rows are masked and send
  nothing) and returns logits, routing and the dispatch statistics of every layer.
* :meth:`ServingRuntime.generate` decodes greedily. Like :func:`moe_edge.model.transformer.
  generate` it has no KV cache: each new token re-runs the model over the fixed
  ``[R, S0 + max_new]`` buffer, with the not-yet-written tail masked out of the dispatch (so it
  sends nothing; causal attention keeps earlier positions exact).

Both compile once per shape: tables and slot weights are program *arguments*, so a new
placement with the same slot count reuses the program.

Migration (double buffered)
---------------------------
:meth:`ServingRuntime.apply_placement` = :meth:`prepare_placement` + :meth:`commit`:

1. *Slots.* Kept experts keep their slots (:func:`moe_edge.migration.slots.
   assign_slots_stable` on the runtime's current slot table); new replicas take free slots.
   ``S`` never shrinks (it may grow; the serving programs then compile once more).
2. *Copy* (``prepare_placement``). One jitted ``shard_map`` program builds the new slot arrays
   on every device: kept slots are copied locally, every added replica ``(n, l, e)`` is sent
   from a current holder by ``jax.lax.ppermute``. Copies are grouped into rounds of one layer in
   which every source sends to at most one target and every pair carries the same number of
   rows, so each collective carries exactly the moved experts (no padding on the wire): the
   bytes on the links are ``copies * expert_bytes``. Sources: the holder that finishes
   earliest given ``problem.hardware.copy_time`` and what it already sends (or the
   least-busy holder when no problem is given). Replicas with no live holder (after a failure)
   are read from the checkpointed weights instead (host storage to device).
3. *Swap* (``commit``). Until then the old tables and old slot arrays stay in use: requests
   served between copy and swap run on the old placement, unchanged. ``commit`` swaps the
   tables and slot arrays in one reference assignment under a lock; every step reads them once.
   Every expert is hosted at every moment (the old arrays hold the old placement until the
   swap, the new arrays the new one after). The cost is memory: until the swap a device holds
   its old and new slot arrays.

The copy program is compiled per migration (its pairs and row counts are static).

Failure drill
-------------
:meth:`ServingRuntime.fail_server` (needs ``problem``) follows
:func:`moe_edge.migration.failure.fail_server`: at once the route tables switch to the
surviving replicas (no data moves); experts the failed server held alone are *unreachable*
until they are re-loaded from the checkpointed weights onto surviving servers with room (with
``reload=True``, immediately; else by :meth:`recover`). While any expert is unreachable, a step
whose tokens pick one raises :class:`UnreachableExpertError` (never a silently wrong output).
The failed server keeps its place in the mesh (its device holds nothing and gets no tokens);
on real hardware one rebuilds the mesh over the survivors, which these tables already allow.

Several hosts (GPU)
-------------------
Start every host with the same program and join them before building the mesh::

  jax.distributed.initialize(coordinator_address="10.0.0.1:12345", num_processes=P,
                             process_id=RANK)           # or no arguments under Slurm
  mesh = server_mesh(cluster.num_servers)            # global devices, device n = server n
  rt = ServingRuntime(mesh, model, placement, transport="ragged", problem=problem)

* Every process passes the *same* global inputs (model weights, placement, the per-server
  request lists); each process copies only its own devices' rows, slots and dense replica
  (``jax.make_array_from_callback``), so no host places another server's experts on its GPU.
* Results come back per server: entries of servers on other processes are ``None``; the
  dispatch statistics are replicated and complete on every process.
* Migration copies and the dispatch are NCCL collectives between the GPUs (``ppermute`` /
  ``ragged_all_to_all``); the failure drill's reloads read the checkpoint on the receiving
  host only.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_edge import migration as mig
from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, PlacementProblem
from moe_edge.model.transformer import MoETransformer, expert_weights
from moe_edge.parallel import dispatch as dispatch_lib
from moe_edge.parallel import weights
from moe_edge.parallel.errors import ServingError, UnreachableExpertError
from moe_edge.parallel.failover import FailoverResult, fallback_placement
from moe_edge.parallel.mesh import (AXIS, WEIGHT_NAMES, SlotTables, pack_rows,
                                    shard_layer_weights, shard_rows, tables_from_placement)
from moe_edge.parallel.weights import (ActiveState, Copy, MigrationReport, PendingMigration,
                                       collective_permute_bytes)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepResult:
  """One forward pass over every server's batch.

  Attributes:
    logits: per server ``[R_n, S, V]`` float32 (``None`` for servers of other processes).
    expert_ids: per server ``[R_n, S, L, k]`` int32, the experts each token picked.
    send_rows: ``[L, N, N]`` int64 remote token-choices ``[layer, src, dst]`` (the dispatch
      moves ``send_rows * activation_bytes``; the combine returns the same amount).
    local_choices, remote_choices: ``[L, N]`` int64 valid token-choices per server and layer.
  """
  logits: tuple
  expert_ids: tuple
  send_rows: np.ndarray
  local_choices: np.ndarray
  remote_choices: np.ndarray

  @property
  def coverage(self) -> float:
    """Fraction of token-choices served on the token's own server."""
    total = self.local_choices.sum() + self.remote_choices.sum()
    return float(self.local_choices.sum() / max(total, 1))

  def dispatch_bytes(self, activation_bytes: int) -> np.ndarray:
    """``[L, N, N]`` bytes of the dispatch ``src -> dst`` (``bytes_matrix`` of the cost model)."""
    return self.send_rows * int(activation_bytes)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  """Greedy generation on every server.

  Attributes:
    tokens: per server ``[R_n, S0 + max_new]`` int32, prompt and generated tokens.
    send_rows: ``[N, N]`` int64 remote token-choices over all forwards and layers (what this
      cache-free runtime really sent; a KV-cache server would send one forward's worth).
    forwards: forward passes run (``max_new``).
  """
  tokens: tuple
  send_rows: np.ndarray
  forwards: int



# --------------------------------------------------------------------------------------------
# Programs and host transfers
# --------------------------------------------------------------------------------------------
def _is_routed_expert(path, x) -> bool:
  """nnx filter: the ``[E, d, f]`` / ``[E, f, d]`` routed-expert weights of MoE blocks."""
  return bool(path) and path[-1] in WEIGHT_NAMES and len(x.shape) == 3


@functools.lru_cache(maxsize=16)
def _programs(graphdef, experts_treedef, experts_leaves: tuple, mesh: Mesh, transport: str,
              capacity: int | None) -> tuple[Callable, Callable]:
  """The jitted ``(forward, decode)`` of one model structure on one mesh and transport.

  Shared by every runtime of the same model shape (so tests and restarts compile once). The
  routed expert weights of the model are replaced by zeros inside the program (the dispatch
  reads the slot arrays instead; XLA drops the unused zeros), so the devices hold only the
  dense weights and their own slots.
  """
  layer_fn = dispatch_lib.layer_program(mesh, transport, capacity)
  abstract = jax.tree_util.tree_unflatten(
      experts_treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in experts_leaves])

  def forward(dense, slots, route, dest_slot, tokens, token_mask, routing):
    """``tokens [B, S]``, ``token_mask [B, S]`` -> logits, expert ids, stacked DispatchStats."""
    experts = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    model = nnx.merge(graphdef, experts, dense)
    b, s = tokens.shape
    mask = token_mask.reshape(b * s)
    stats = []

    def moe_fn(layer, x, ids, gates, *unused):
      d, k = x.shape[-1], ids.shape[-1]
      w = slots[layer]
      y, st = layer_fn(x.reshape(b * s, d), ids.reshape(b * s, k).astype(jnp.int32),
                       gates.reshape(b * s, k), mask, route[:, layer], dest_slot[:, layer],
                       w["w_gate_up"], w["w_down"])
      stats.append(st)
      return y.reshape(b, s, d)

    logits, aux = model(tokens, routing=routing, moe_fn=moe_fn)
    return logits, aux["expert_ids"], jax.tree.map(lambda *a: jnp.stack(a), *stats)

  def decode(dense, slots, route, dest_slot, buf, row_mask, t):
    """One greedy step: token ``t`` of every row from the logits at ``t - 1``; the tail
    (positions ``>= t``) is masked out of the dispatch."""
    _, s = buf.shape
    token_mask = row_mask[:, None] & (jnp.arange(s)[None, :] < t)
    logits, _, st = forward(dense, slots, route, dest_slot, buf, token_mask, None)
    last = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)
    nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
    buf = jax.lax.dynamic_update_index_in_dim(buf, nxt[:, None], t, axis=1)
    return buf, st.send_rows.sum(axis=0)

  return jax.jit(forward), jax.jit(decode)


def _replicate(tree, mesh: Mesh):
  """Every leaf copied to every device of ``mesh`` (each process copies its own devices)."""
  sharding = NamedSharding(mesh, P())

  def one(a):
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(one, tree)


def _rows_by_server(a: jax.Array, num_servers: int) -> tuple:
  """Split a row-sharded ``[N * R, ...]`` global array into per-server host arrays (``None``
  for rows this process does not hold)."""
  r = a.shape[0] // num_servers
  out: list = [None] * num_servers
  for shard in a.addressable_shards:
    lo, hi, _ = shard.index[0].indices(a.shape[0])
    data = np.asarray(shard.data)
    for n in range(lo // r, hi // r):
      if out[n] is None:
        out[n] = data[n * r - lo:(n + 1) * r - lo]
  return tuple(out)


def _replicated_host(a: jax.Array) -> np.ndarray:
  """Host copy of a replicated array (works under ``jax.distributed`` too)."""
  return np.asarray(a.addressable_data(0))


# --------------------------------------------------------------------------------------------
# The runtime
# --------------------------------------------------------------------------------------------
class ServingRuntime:
  """A placed MoE model serving every server's requests on its own device (module docstring).

  Args:
    mesh: ``server_mesh(N)``.
    model: the :class:`~moe_edge.model.transformer.MoETransformer` to serve. Its routed expert
      weights are the *checkpoint*: copied into the slots at start and re-read after failures;
      the devices hold only their slots and the dense weights.
    placement: the initial placement (``[N, L, E]`` for the model).
    transport: ``"padded"`` (any backend) or ``"ragged"`` (GPU/TPU).
    problem: statistics, capacities and cluster (:class:`PlacementProblem`); used to choose copy
      sources by link time and needed by :meth:`fail_server`.
    num_slots: slots per layer and server (default: the placement's); more leaves room to grow.
    capacity: rows per server pair of the padded transport (default: the safe bound).
  """

  def __init__(self, mesh: Mesh, model: MoETransformer, placement: Placement,
               transport: str = "padded", problem: PlacementProblem | None = None,
               num_slots: int | None = None, capacity: int | None = None):
    self.mesh, self.cfg, self.transport = mesh, model.cfg, transport
    self.problem = problem
    tables = tables_from_placement(placement, num_slots, model=self.cfg)
    tables.check_mesh(mesh)
    if problem is not None and problem.shape != placement.hosts.shape:
      raise ServingError(f"problem is {list(problem.shape)} but the placement is "
                         f"{list(placement.hosts.shape)}; they are for different clusters or "
                         f"models.")
    dispatch_lib.layer_program(mesh, transport, capacity)  # checks transport and capacity
    graphdef, experts, dense = nnx.split(model, _is_routed_expert, ...)
    leaves, treedef = jax.tree_util.tree_flatten(experts)
    self._forward, self._decode = _programs(
        graphdef, treedef, tuple((tuple(a.shape), np.dtype(a.dtype)) for a in leaves), mesh,
        transport, None if capacity is None else int(capacity))
    self._dense = _replicate(dense, mesh)
    ew = {k: np.asarray(v) for k, v in expert_weights(model).items()}  # [L, E, ...]
    # Checkpoint rows for migration, in the slots' fused layout (gate in [..., :f]).
    self._store = {"w_gate_up": np.concatenate([ew["w_gate"], ew["w_up"]], axis=-1),
                   "w_down": ew["w_down"]}
    self.expert_bytes = int(sum(int(np.prod(w.shape[2:])) * w.dtype.itemsize
                                for w in self._store.values()))
    self._lock = threading.Lock()
    self._failed: set[int] = set()
    self._unreachable: tuple[tuple[int, int], ...] = ()
    self._recovery: Placement | None = None
    slots = shard_layer_weights(ew["w_gate"], ew["w_up"], ew["w_down"], tables, mesh,
                                fuse_gate_up=True)
    placement = Placement(placement.hosts, placement.route, tables.slot_expert,
                          placement.method, dict(placement.info))
    self._active = self._make_active(placement, tables, slots)

  # ---- state -------------------------------------------------------------------------------
  @property
  def num_servers(self) -> int:
    return self.mesh.shape[AXIS]

  @property
  def placement(self) -> Placement:
    """The placement in use (its slot table is the runtime's slot layout)."""
    return self._current().placement

  @property
  def tables(self) -> SlotTables:
    return self._current().tables

  @property
  def num_slots(self) -> int:
    return self.tables.num_slots

  @property
  def failed_servers(self) -> tuple[int, ...]:
    return tuple(sorted(self._failed))

  @property
  def unreachable(self) -> tuple[tuple[int, int], ...]:
    """``(layer, expert)`` held only by a failed server and not yet re-loaded."""
    return self._unreachable

  def slot_weights(self) -> tuple[dict[str, jax.Array], ...]:
    """The current per-layer slot arrays ``{"w_gate_up": [N, S, d, 2f], "w_down": [N, S, f,
    d]}`` (gate and up fused once at load, gate in ``[..., :f]``; read-only use)."""
    return self._current().slots

  def _current(self) -> ActiveState:
    with self._lock:
      return self._active

  def _make_active(self, placement: Placement, tables: SlotTables, slots) -> ActiveState:
    return weights.active_state(placement, tables, slots, self.mesh)


  # ---- serving -----------------------------------------------------------------------------
  def _pack(self, per_server: Sequence, rows: int | None, what: str):
    n = self.num_servers
    if len(per_server) != n:
      raise ServingError(f"{what}: got batches for {len(per_server)} servers, the cluster has "
                         f"{n}; pass one (possibly empty) batch per server.")
    arrays = [np.asarray(a) for a in per_server]
    for i, a in enumerate(arrays):
      if a.ndim < 2:
        raise ServingError(f"{what}: server {i}'s batch must be [R, S, ...], got shape "
                           f"{a.shape}.")
      if i in self._failed and a.shape[0]:
        raise ServingError(f"{what}: server {i} has failed; send its {a.shape[0]} requests to a "
                           f"surviving server.")
    try:
      return pack_rows(arrays, rows)
    except ValueError as e:
      raise ServingError(f"{what}: {e}") from None

  def _check_tokens(self, tokens: np.ndarray):
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ServingError(f"token ids must be integers, got {tokens.dtype}.")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
      raise ServingError(f"token ids lie in [{tokens.min()}, {tokens.max()}] but model "
                         f"{self.cfg.name!r} has vocab_size {self.cfg.vocab_size}.")

  def _check_reachable(self, send_rows: np.ndarray) -> None:
    """Raise if any token-choice went to a failed server (an unreachable expert)."""
    if not self._failed:
      return
    dead = sorted(self._failed)
    lost = int(send_rows[..., dead].sum())
    if lost:
      raise UnreachableExpertError(
          f"{lost} token-choice(s) picked experts held only by failed server(s) {dead} "
          f"(unreachable: {list(self._unreachable)}); call recover() to re-load them from the "
          f"checkpoint, then serve again.")

  def step(self, tokens_per_server: Sequence, routing: tuple[Sequence, Sequence] | None = None,
           rows: int | None = None) -> StepResult:
    """One distributed forward pass.

    Args:
      tokens_per_server: ``N`` int arrays ``[R_n, S]`` (same ``S``; ``R_n`` may differ, 0 for an
        idle or failed server).
      routing: optional ``(ids_per_server, gates_per_server)``, each ``N`` arrays
        ``[R_n, S, L, k]``, replayed instead of the router (trace replay).
      rows: pad every server to this many sequences (default the largest ``R_n``), so batches
        of varying size share one compiled program.
    """
    tokens, row_mask = self._pack(tokens_per_server, rows, "step")
    self._check_tokens(tokens)
    r_dev = None
    if routing is not None:
      ids, _ = self._pack(routing[0], rows, "routing ids")
      gates, _ = self._pack(routing[1], rows, "routing gates")
      r_dev = (shard_rows(ids.astype(np.int32), self.mesh),
               shard_rows(gates.astype(np.float32), self.mesh))
    token_mask = np.repeat(row_mask[:, None], tokens.shape[1], axis=1)
    active = self._current()
    logits, ids, st = self._forward(self._dense, active.slots, active.route, active.dest_slot,
                                    shard_rows(tokens.astype(np.int32), self.mesh),
                                    shard_rows(token_mask, self.mesh), r_dev)
    send = _replicated_host(st.send_rows).astype(np.int64)
    self._check_reachable(send)
    n = self.num_servers
    counts = row_mask.reshape(n, -1).sum(axis=1)
    cut = lambda parts: tuple(None if p is None else p[:c] for p, c in zip(parts, counts))
    return StepResult(logits=cut(_rows_by_server(logits, n)),
                      expert_ids=cut(_rows_by_server(ids, n)), send_rows=send,
                      local_choices=_replicated_host(st.local_choices).astype(np.int64),
                      remote_choices=_replicated_host(st.remote_choices).astype(np.int64))

  def generate(self, prompts_per_server: Sequence, max_new_tokens: int,
               rows: int | None = None,
               on_step: Callable[[int], None] | None = None) -> GenerateResult:
    """Greedy decoding of every server's prompts on its own device.

    Args:
      prompts_per_server: ``N`` int arrays ``[R_n, S0]`` (one prompt length for all).
      max_new_tokens: tokens to generate per prompt.
      rows: pad every server to this many prompts (default the largest ``R_n``).
      on_step: called with the position just written after every decoding step (e.g. to
        prepare or commit a migration between steps).
    """
    if max_new_tokens < 1:
      raise ServingError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    prompts, row_mask = self._pack(prompts_per_server, rows, "generate")
    self._check_tokens(prompts)
    s0 = prompts.shape[1]
    total = s0 + max_new_tokens
    if total > self.cfg.max_seq_len:
      raise ServingError(f"prompt ({s0}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_seq_len={self.cfg.max_seq_len} of model {self.cfg.name!r}.")
    buf = np.zeros((prompts.shape[0], total), np.int32)
    buf[:, :s0] = prompts
    buf = shard_rows(buf, self.mesh)
    mask = shard_rows(row_mask, self.mesh)
    sent = []
    for t in range(s0, total):
      active = self._current()
      buf, rows_sent = self._decode(self._dense, active.slots, active.route, active.dest_slot,
                                    buf, mask, jnp.int32(t))
      if self._failed:
        self._check_reachable(_replicated_host(rows_sent))
      sent.append(rows_sent)
      if on_step is not None:
        on_step(t)
    n = self.num_servers
    counts = row_mask.reshape(n, -1).sum(axis=1)
    tokens = tuple(None if p is None else p[:c]
                   for p, c in zip(_rows_by_server(buf, n), counts))
    total_sent = sum(_replicated_host(s).astype(np.int64) for s in sent)
    return GenerateResult(tokens=tokens, send_rows=total_sent, forwards=len(sent))

  # ---- migration (moe_edge.parallel.weights) ------------------------------------------------
  def prepare_placement(self, new: Placement) -> PendingMigration:
    """Start building the slot arrays of ``new`` (kept experts keep their slots); serving
    continues on the current placement until :meth:`commit`."""
    base = self._current()
    target = weights.stable_target(base.placement, base.tables.slot_expert, new, self._failed,
                                   self.problem)
    hardware = None if self.problem is None else self.problem.hardware
    return weights.prepare(base, target, self._failed, hardware, self._store,
                           self.expert_bytes, self.mesh, self.cfg)

  def commit(self, pending: PendingMigration) -> MigrationReport:
    """Swap in a prepared placement (tables and slot arrays at once)."""
    with self._lock:
      if self._active is not pending._base:
        raise ServingError("another placement was committed after this migration was "
                           "prepared; prepare it again from the current placement.")
      self._active = pending._active
    return pending.report

  def apply_placement(self, new: Placement) -> MigrationReport:
    """Move expert weights to ``new`` and swap it in (:meth:`prepare_placement`, wait,
    :meth:`commit`); ``report.seconds`` is the time until the new arrays were ready."""
    t0 = time.perf_counter()
    pending = self.prepare_placement(new).block()
    seconds = time.perf_counter() - t0
    self.commit(pending)
    return dataclasses.replace(pending.report, seconds=seconds)

  # ---- failures (moe_edge.parallel.failover) ------------------------------------------------
  def fail_server(self, server: int, reload: bool = True) -> FailoverResult:
    """Lose ``server`` (module docstring): reroute at once, then (``reload``) re-load the experts
    it held alone from the checkpoint onto surviving servers with room."""
    if self.problem is None:
      raise ServingError("fail_server needs the placement problem (capacities, statistics and "
                         "links): construct ServingRuntime(..., problem=problem).")
    if server in self._failed:
      raise ServingError(f"server {server} has already failed.")
    base = self._current()
    try:
      target, report = mig.fail_server(base.placement, server, self.problem)
    except PlacementError as e:
      raise ServingError(f"cannot survive losing server {server}: {e}") from e
    after = mig.failed_problem(self.problem, server)
    interim = fallback_placement(base.placement, base.tables.slot_expert, server, after)
    active = self._make_active(interim, tables_from_placement(interim, model=self.cfg),
                               base.slots)  # no weights move
    with self._lock:
      if self._active is not base:
        raise ServingError("the placement changed while the failover was planned; call "
                           "fail_server again.")
      self._active = active
      self._failed.add(server)
      self.problem = after
      self._unreachable = tuple(report.orphans)
      self._recovery = target
    reload_report = self.recover() if reload else None
    return FailoverResult(server, tuple(report.orphans), report, reload_report)

  def recover(self) -> MigrationReport | None:
    """Re-load the experts of failed servers from the checkpoint and swap in the recovered
    placement (None when there is nothing to recover)."""
    if self._recovery is None:
      return None
    report = self.apply_placement(self._recovery)
    self._recovery = None
    self._unreachable = ()
    return report


__all__ = ["Copy", "FailoverResult", "GenerateResult", "MigrationReport", "PendingMigration",
           "ServingError", "ServingRuntime", "StepResult", "UnreachableExpertError",
           "collective_permute_bytes"]

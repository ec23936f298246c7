"""Distributed execution: one device per server, experts where the placement puts them.

Modules
-------
* :mod:`moe_edge.parallel.mesh`: ``server_mesh`` (one axis ``"server"`` over devices in natural
  order), ``SlotTables`` / ``tables_from_placement`` (route, destination slot and slot contents
  per server and layer), ``shard_expert_weights`` (each device gets only its slots' experts),
  ``pack_rows`` / ``shard_rows`` (per-server token batches, padded and masked).
* :mod:`moe_edge.parallel.dispatch`: the jitted ``shard_map`` MoE layer (``make_moe_dispatch``)
  with transports ``"padded"`` (``all_to_all``, any backend) and ``"ragged"``
  (``ragged_all_to_all``, GPU/TPU), its traffic statistics (``DispatchStats``; exactly the cost
  model's ``bytes_matrix``), capacity helpers, and ``distributed_moe_fn`` for running the whole
  ``MoETransformer`` with its batch split over servers.

Quick start (one host)
----------------------
::

  mesh = server_mesh(cluster.num_servers)                 # N devices, axis "server"
  tables = tables_from_placement(placement, model=model_cfg)
  w = expert_weights(model)                               # [L, E, d, f] ...
  slots = shard_expert_weights(w["w_gate"], w["w_up"], w["w_down"], tables, mesh)
  moe_fn = distributed_moe_fn(mesh, tables, slots, transport="ragged")   # "padded" on CPU
  logits, aux = model(shard_rows(tokens, mesh), moe_fn=moe_fn)  # tokens [B, S], B % N == 0

On CPU, simulate ``N`` servers with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
set before JAX starts (the tests use 8).

Several hosts (GPU)
-------------------
Every host runs the same program; JAX joins them into one set of global devices and the
``server`` mesh spans all of them (device ``n`` is server ``n``, hosts in process order)::

  import jax
  jax.distributed.initialize(coordinator_address="10.0.0.1:12345",  # host 0's address
                             num_processes=4, process_id=RANK)      # RANK = 0..3 on each host
  mesh = server_mesh(cluster.num_servers)        # jax.device_count() must be >= N

* ``coordinator_address`` is a host:port that every host can reach (process 0 listens there);
  with one GPU per process set ``local_device_ids`` (or ``CUDA_VISIBLE_DEVICES``) per process.
  On Slurm or other recognised clusters ``jax.distributed.initialize()`` without arguments
  reads them from the environment.
* Build every input from the *same global* host arrays on every process (same seeds, same
  placement file, same routing trace): ``shard_rows`` and ``shard_expert_weights`` copy only the
  rows / slots of the process's own devices, so a host never materialises other servers'
  experts on its GPU.
* Results are global ``jax.Array`` s: read your own part with ``y.addressable_shards``;
  ``DispatchStats`` are replicated, so every process can read them whole.
* Collectives go over NCCL between GPUs (``transport="ragged"`` sends exactly the remote rows;
  ``"padded"`` sends fixed-size buffers, see ``required_capacity`` / ``bucket_capacity``).
  On CPU, processes talk over Gloo (``tests/parallel/test_multiprocess.py`` runs 2 processes
  with 2 devices each this way).
* A mesh whose devices are not in natural order makes XLA:GPU fall back ("only supports IOTA
  device assignment"); ``server_mesh`` always sorts by device id and the placement's mapping of
  experts to servers lives in the slot tables instead.
"""

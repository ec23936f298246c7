"""Collect an activation trace: which experts every token of every server's stream picks.

Two sources:

* ``--source corpus`` (default): build per-server request streams from the real held-out text
  (server i mostly serves domain ``DOMAINS[i % 5]``, share ``--alpha``), run the Flax MoE model
  (``--model_config``, weights from ``--checkpoint``; ``none`` = random initialisation) and record
  its routing::

    python experiments/collect_traces.py --model_config small_moe \\
        --checkpoint checkpoints/small_moe/final --num_servers 4 --alpha 0.8

* ``--source stats``: sample a trace at the real shape of OLMoE-1B-7B or Mixtral-8x7B from their
  measured per-domain routing counts (``moe_edge.workload.stats_traces``)::

    python experiments/collect_traces.py --source stats --stats_model olmoe_1b_7b \\
        --num_servers 4 --requests_per_server 256 --seq_len 128 --alpha 0.8

``--drift "step:home0,home1,...;step:..."`` changes the servers' home domains at request steps
(a home may be a mix such as ``arxiv=0.5+c4=0.5``). The trace goes to ``--out`` (default
``traces/<model>_<N>srv.npz``; checked before any work, an existing file replaced only with
``--overwrite``, written atomically) and its activation summary is printed. Bad flags and input
files are one ``collect_traces.py: error: ...`` line (exit 2).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from moe_edge.config import model_config
from moe_edge.io import check_output_file, cli
from moe_edge.workload.stats import format_summary, summarize
from moe_edge.workload.streams import DriftSchedule

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", "corpus", ["corpus", "stats"],
                  "corpus: run the Flax model over real text; stats: sample from real counts.")
flags.DEFINE_string("model_config", "small_moe", "Model preset (configs/models/) for --source "
                    "corpus.")
flags.DEFINE_string("checkpoint", "checkpoints/small_moe/final",
                    "Checkpoint directory for --source corpus; 'none' = random-init model.")
flags.DEFINE_enum("stats_model", "olmoe_1b_7b", ["olmoe_1b_7b", "mixtral_8x7b"],
                  "Real routing statistics for --source stats.")
flags.DEFINE_integer("num_servers", 4, "Servers (request streams).")
flags.DEFINE_integer("requests_per_server", 32, "Requests per server.")
flags.DEFINE_integer("seq_len", 128, "Tokens per request.")
flags.DEFINE_float("alpha", 0.8, "Share of a server's requests from its home domain, in [0, 1].")
flags.DEFINE_integer("seed", 0, "Seed of the streams / sampling (and of a random-init model).")
flags.DEFINE_string("home_domains", "", "Comma-separated home domain per server (default: "
                    "server i -> DOMAINS[i % 5]).")
flags.DEFINE_string("drift", "", "Home changes: 'step:home0,home1,...;step:...'.")
flags.DEFINE_integer("steps", None, "Spread each server's requests over this many steps "
                     "(default: request i at step i).")
flags.DEFINE_integer("batch_size", 16, "Requests per forward pass (--source corpus).")
flags.DEFINE_enum("split", "heldout", ["heldout", "train"], "Corpus split of the requests.")
flags.DEFINE_string("out", None, "Output .npz (default traces/<model>_<N>srv.npz).")
flags.DEFINE_float("hot_fraction", 0.25, "Hot-set size for the printed summary (share of E).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")


def _load_model(cfg, checkpoint: str, seed: int):
  """``(model, description)``: restored from ``checkpoint`` or randomly initialised."""
  from flax import nnx  # noqa: PLC0415  (the stats source needs no JAX)

  from moe_edge.model.checkpoint import restore_checkpoint  # noqa: PLC0415
  from moe_edge.model.transformer import MoETransformer  # noqa: PLC0415
  if checkpoint.lower() == "none":
    return MoETransformer(cfg, nnx.Rngs(seed)), f"random init (seed {seed})"
  path = Path(checkpoint)
  if not path.is_dir():
    raise app.UsageError(f"no checkpoint at {path}; train one with experiments/train_small_moe.py "
                         f"or pass --checkpoint none for a randomly initialised model.")
  model, _, step = restore_checkpoint(path, cfg)
  return model, f"{path} (step {step})"


def collect(argv_flags) -> tuple[object, Path]:
  """Build the trace the flags describe; return it and the output path."""
  f = argv_flags
  drift = DriftSchedule.parse(f.drift) if f.drift else None
  homes = [h.strip() for h in f.home_domains.split(",")] if f.home_domains else None
  if f.source == "stats":
    from moe_edge.workload.stats_traces import sample_stats_trace  # noqa: PLC0415
    trace = sample_stats_trace(f.stats_model, f.num_servers, f.requests_per_server * f.seq_len,
                               f.alpha, f.seed, home_domains=homes, drift=drift,
                               request_len=f.seq_len)
    name = f.stats_model
  else:
    from moe_edge.workload.record import record_trace  # noqa: PLC0415
    from moe_edge.workload.streams import make_streams  # noqa: PLC0415
    cfg = model_config(f.model_config)
    model, origin = _load_model(cfg, f.checkpoint, f.seed)
    requests = make_streams(f.num_servers, f.requests_per_server, f.seq_len, f.alpha, f.seed,
                            split=f.split, home_domains=homes, drift=drift, steps=f.steps)
    note = json.dumps(dict(generator="experiments/collect_traces.py", weights=origin,
                           alpha=f.alpha, seed=f.seed, seq_len=f.seq_len,
                           requests_per_server=f.requests_per_server, split=f.split,
                           homes=homes or "default", drift=f.drift,
                           domains=[r.domain for r in requests]))
    trace = record_trace(model, cfg, requests, f.num_servers, f.batch_size,
                         source=f"corpus/{f.split} (allenai/OLMoE 357454f texts)", note=note)
    name = cfg.name
  out = Path(f.out) if f.out else Path("traces") / f"{name}_{f.num_servers}srv.npz"
  return trace, out


def check_flags(f) -> Path:
  """Raise a usage error naming the first flag that cannot make a trace (before any work);
  return the checked output path."""
  cli.check_flags(f, at_least_1=("num_servers", "requests_per_server", "seq_len", "batch_size",
                                 "steps"), at_least_0=("seed",),
                  ranges={"alpha": (0.0, 1.0, False), "hot_fraction": (0.0, 1.0, True)})
  if f.drift:
    DriftSchedule.parse(f.drift)
  if f.source == "corpus":
    model_config(f.model_config)  # an unknown preset fails now, not after loading JAX
  homes = [h.strip() for h in f.home_domains.split(",")] if f.home_domains else None
  if homes is not None and len(homes) != f.num_servers:
    raise app.UsageError(f"--home_domains names {len(homes)} domains for --num_servers="
                         f"{f.num_servers}; give one per server.")
  name = f.stats_model if f.source == "stats" else f.model_config
  out = Path(f.out) if f.out else Path("traces") / f"{name}_{f.num_servers}srv.npz"
  return check_output_file(out, overwrite=f.overwrite, suffix=".npz")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  t0 = time.perf_counter()
  check_flags(FLAGS)
  trace, out = collect(FLAGS)
  trace.save(out)
  print(f"wrote {out}: {trace.num_tokens:,} tokens, {trace.num_layers} MoE layers, "
        f"{trace.num_experts} experts, top-{trace.top_k}, {trace.num_servers} servers "
        f"(source: {trace.source}; {time.perf_counter() - t0:.1f} s)")
  print()
  print(format_summary(summarize(trace, FLAGS.hot_fraction)))


if __name__ == "__main__":
  cli.run(main)

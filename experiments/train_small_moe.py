"""Train the small byte-level MoE language model on the five-domain corpus.

  python experiments/train_small_moe.py --model small_moe --steps 4000 --batch 64 --seq_len 256 \
      --ckpt_dir /tmp/small_moe

Balanced batches over the domains (``moe_edge.workload.corpus.sample_batch``), AdamW with linear
warmup and cosine decay, global-norm clipping, load-balancing aux loss (``cfg.aux_loss_coef``).
Every ``--save_every`` steps an orbax checkpoint with the optimizer state and the metrics history
goes to ``<ckpt_dir>/step_<N>`` (written atomically; ``--resume`` continues from the newest
complete one, reporting and removing what an interrupted save left; the batch of step N depends
only on ``--seed`` and N, so a resumed run sees the same data as an uninterrupted one, and its
metrics history continues the interrupted run's). At the end:

  <ckpt_dir>/final          parameters only, in --param_dtype_save (bf16 by default)
  <ckpt_dir>/metrics.json   held-out loss per domain (nats/byte, bits/byte), command line, steps,
                            wall time, and per MoE layer the total-variation distance between the
                            domains' expert-activation distributions on held-out text. Also
                            written (``"finished": false``) at every save, so a killed run keeps
                            its history.
  <ckpt_dir>/manifest.json  the run's identity (model config, training settings, seed; the code
                            version is recorded, not compared) and the files it owns.

The folder is checked before any work: a run into a folder that holds another run (or the
shipped model) is refused unless ``--resume`` (same identity required) or ``--overwrite``.

Smoke test on CPU: ``--model tiny --steps 3 --batch 4 --seq_len 32 --ckpt_dir /tmp/t``.
"""

import dataclasses
import functools
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from moe_edge.config import model_config
from moe_edge.io import OutputFolder, RunIdentity, atomic, cli
from moe_edge.model import checkpoint as ckpt_lib
from moe_edge.model.transformer import MoETransformer, lm_loss, token_losses
from moe_edge.workload import corpus

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "small_moe", "Model preset under configs/models/.")
flags.DEFINE_integer("steps", 4000, "Total optimizer steps (a resumed run stops here too).")
flags.DEFINE_integer("batch", 64, "Sequences per batch (balanced over the 5 domains).")
flags.DEFINE_integer("seq_len", 256, "Tokens (bytes) per sequence; <= the config's max_seq_len.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("warmup", 200, "Linear warmup steps.")
flags.DEFINE_float("min_lr_ratio", 0.1, "Final learning rate as a fraction of --lr (cosine).")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only, not norms).")
flags.DEFINE_float("clip", 1.0, "Global gradient-norm clip.")
flags.DEFINE_string("ckpt_dir", "checkpoints/small_moe", "Checkpoint / output directory.")
flags.DEFINE_integer("save_every", 500, "Save a resumable checkpoint every N steps (0: never).")
flags.DEFINE_integer("keep", 2, "Resumable step checkpoints to keep (0: all).")
flags.DEFINE_integer("eval_every", 500, "Held-out evaluation every N steps (0: only at the end).")
flags.DEFINE_integer("eval_windows", 32, "Held-out windows per domain for periodic evaluation.")
flags.DEFINE_integer("final_eval_windows", 256,
                     "Held-out windows per domain for the final evaluation (capped by the "
                     "number of non-overlapping windows the held-out text holds).")
flags.DEFINE_bool("resume", False, "Continue the run in --ckpt_dir from its newest checkpoint "
                  "(the same model, training settings and seed are required).")
flags.DEFINE_bool("overwrite", False, "Replace the files of another run (or of the shipped "
                  "model) in --ckpt_dir instead of refusing.")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation and of the data order.")
flags.DEFINE_integer("log_every", 50, "Print training metrics every N steps.")
flags.DEFINE_enum("param_dtype_save", "bf16", ["bf16", "f32"], "dtype of the final checkpoint.")
flags.DEFINE_enum("compute_dtype", "f32", ["f32", "bf16"],
                  "Matmul dtype (params, router, norms and softmax stay float32).")

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def make_optimizer(lr: float, warmup: int, steps: int, min_lr_ratio: float, weight_decay: float,
                   clip: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (b2=0.95) with warmup + cosine decay and global-norm clipping; no decay on vectors."""
  warmup = max(0, min(warmup, steps - 1))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=lr * min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
  tx = optax.chain(optax.clip_by_global_norm(clip),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                               mask=decay_mask))
  return tx, schedule


def eval_windows(tokens: np.ndarray, n: int, seq_len: int) -> np.ndarray:
  """Up to ``n`` non-overlapping windows ``[n', seq_len + 1]`` spread evenly over ``tokens``."""
  w = seq_len + 1
  avail = len(tokens) // w
  if avail == 0:
    raise corpus.CorpusError(f"held-out text of {len(tokens)} bytes is shorter than one window "
                             f"of {w}; use a shorter --seq_len.")
  idx = np.unique(np.linspace(0, avail - 1, num=min(n, avail)).round().astype(np.int64))
  return np.stack([np.asarray(tokens[i * w:(i + 1) * w]) for i in idx]).astype(np.int32)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """``0.5 * sum_e |p - q|`` over the last axis."""
  return 0.5 * np.abs(p - q).sum(axis=-1)


def routing_tv(counts: dict[str, np.ndarray]) -> list[dict]:
  """Per MoE layer, mean and max TV distance between domains' expert-activation distributions.

  ``counts[domain] [L, E]``: token-choices per expert (all k ranks).
  """
  names = list(counts)
  dist = {n: counts[n] / np.maximum(counts[n].sum(axis=-1, keepdims=True), 1) for n in names}
  pairs = list(itertools.combinations(names, 2))
  n_layers = next(iter(counts.values())).shape[0]
  out = []
  for l in range(n_layers):
    tv = {f"{a}|{b}": float(total_variation(dist[a][l], dist[b][l])) for a, b in pairs}
    vals = list(tv.values())
    out.append({"layer": l, "mean": float(np.mean(vals)), "max": float(np.max(vals)),
                "pairs": tv})
  return out


class Evaluator:
  """Held-out NLL per domain and expert-activation counts, with one jitted forward shape."""

  def __init__(self, graphdef, n_experts: int, batch: int):
    self.batch = batch

    @jax.jit
    def eval_step(params, tokens, mask):
      model = nnx.merge(graphdef, params)
      nll, aux = token_losses(model, tokens)  # [B, S]
      onehot = jax.nn.one_hot(aux["expert_ids"], n_experts, dtype=jnp.int32)  # [B,S,L,k,E]
      counts = jnp.einsum("bslke,b->le", onehot, mask.astype(jnp.int32))
      return jnp.sum(nll * mask[:, None]), counts

    self.eval_step = eval_step

  def __call__(self, params, windows: dict[str, np.ndarray]
               ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``windows[domain] [n, S+1]`` -> (``{domain: nats/byte}``, ``{domain: counts [L, E]}``).

    A short last chunk is padded to the batch size and the padded rows are masked out.
    """
    losses, counts = {}, {}
    for name, w in windows.items():
      total, cnt = 0.0, 0
      for i in range(0, len(w), self.batch):
        chunk = w[i:i + self.batch]
        real = len(chunk)
        mask = np.zeros(self.batch, np.float32)
        mask[:real] = 1.0
        if real < self.batch:
          chunk = np.concatenate([chunk, np.repeat(chunk[:1], self.batch - real, axis=0)])
        s, c = self.eval_step(params, jnp.asarray(chunk), jnp.asarray(mask))
        total += float(s)
        cnt = cnt + np.asarray(c, dtype=np.int64)
      losses[name] = total / (len(w) * (w.shape[1] - 1))
      counts[name] = cnt
    return losses, counts


def make_train_step(graphdef, tx: optax.GradientTransformation):
  """Jitted ``(params, opt_state, tokens [B, S+1]) -> (params, opt_state, metrics)``."""

  def loss_fn(params, tokens):
    return lm_loss(nnx.merge(graphdef, params), tokens)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, tokens):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics

  return train_step


def batch_for_step(train: dict[str, np.ndarray], seed: int, step: int, batch: int,
                   seq_len: int) -> np.ndarray:
  """The training batch of ``step``: a function of (seed, step) only, so resuming is exact."""
  tokens, _ = corpus.sample_batch(train, np.random.default_rng([seed, step]), batch, seq_len)
  return tokens


def fmt_losses(losses: dict[str, float]) -> str:
  return " ".join(f"{k}={v / math.log(2):.3f}" for k, v in losses.items())


# Settings that define a training run, with the model config and --seed: --resume requires them
# unchanged. Logging, evaluation and saving flags may change between resumes.
RUN_FLAGS = ("steps", "batch", "seq_len", "lr", "warmup", "min_lr_ratio", "weight_decay", "clip",
             "compute_dtype")
OUTPUTS = ("step_*", "final", "metrics.json")
REFUSE_HINT = ("pass --resume to continue that run, choose a new --ckpt_dir, or pass --overwrite "
               "to replace it")


def check_flags() -> None:
  """Raise app.UsageError naming the first flag whose value cannot make a run."""
  for name in ("steps", "batch", "seq_len", "log_every", "eval_windows", "final_eval_windows"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value} must be at least 1.")
  for name in ("warmup", "save_every", "eval_every", "keep", "seed"):
    if FLAGS[name].value < 0:
      raise app.UsageError(f"--{name}={FLAGS[name].value} must be 0 or more.")
  for name, lo, hi, lo_open in (("lr", 0.0, math.inf, True), ("clip", 0.0, math.inf, True),
                                ("weight_decay", 0.0, math.inf, False),
                                ("min_lr_ratio", 0.0, 1.0, False)):
    v = FLAGS[name].value
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
      bound = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
      raise app.UsageError(f"--{name}={v} must be a finite number {bound}.")


def run_identity(cfg) -> RunIdentity:
  """The run's identity: model config, the :data:`RUN_FLAGS` settings and the seed."""
  settings = {name: FLAGS[name].value for name in RUN_FLAGS}
  return RunIdentity("train_small_moe", {"model": dataclasses.asdict(cfg), **settings},
                     FLAGS.seed)


def claim_folder(cfg) -> OutputFolder:
  """Check --ckpt_dir for this run (before any work) and remove what interrupted saves left."""
  folder = Path(FLAGS.ckpt_dir)
  leftovers = ckpt_lib.partial_checkpoints(folder)
  out = OutputFolder.claim(folder, run_identity(cfg), OUTPUTS, overwrite=FLAGS.overwrite,
                           resume=FLAGS.resume, replace_same=False, refuse_hint=REFUSE_HINT,
                           leftovers=[p.name for p in leftovers])
  for p in leftovers:
    print(f"removing what an interrupted save left: {p}")
    atomic.remove(p)
  return out


def restore_run(folder: Path, cfg, tx, compute_dtype):
  """``(model, opt_state, start_step, history)`` of the newest checkpoint in ``folder``, or
  ``(None, None, 0, [])`` when there is none."""
  latest = ckpt_lib.latest_checkpoint(folder)
  if latest is None:
    print(f"--resume: no checkpoint under {folder}; starting from scratch.")
    return None, None, 0, []
  model, opt_state, step = ckpt_lib.restore_checkpoint(latest, cfg, tx=tx, dtype=compute_dtype)
  if opt_state is None:
    raise ckpt_lib.CheckpointError(f"{latest} has no optimizer state; cannot resume.")
  history = list(ckpt_lib.read_checkpoint_meta(latest)["extra"].get("history", []))
  print(f"resumed from {latest} at step {step} ({len(history)} history records)")
  return model, opt_state, step, history


@dataclasses.dataclass
class Run:
  """A training run's fixed parts and its state (params, optimizer state, history)."""
  out: OutputFolder
  cfg: object
  graphdef: object
  schedule: object
  train_step: object
  evaluator: Evaluator
  eval_sets: dict
  train: dict
  start_step: int
  params: object
  opt_state: object
  history: list
  metrics: dict | None = None
  train_time: float = 0.0
  train_tokens: int = 0

  def summary(self) -> dict:
    """The metrics.json fields known before the final evaluation."""
    return {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "config": self.cfg.name, "total_params": self.cfg.total_params,
        "steps": FLAGS.steps,
        "resumed_from_step": self.start_step if FLAGS.resume else None,
        "batch": FLAGS.batch, "seq_len": FLAGS.seq_len, "lr": FLAGS.lr, "warmup": FLAGS.warmup,
        "seed": FLAGS.seed, "compute_dtype": FLAGS.compute_dtype,
        "device": str(jax.devices()[0].device_kind),
        "train_tokens_per_sec": (self.train_tokens / self.train_time if self.train_time
                                 else None),
        "final_train_metrics": ({k: float(v) for k, v in self.metrics.items()}
                                if self.metrics is not None else None),
        "history": self.history}

  def save(self, step: int) -> None:
    """Step checkpoint (with the history), pruning, and metrics.json so far."""
    path = ckpt_lib.step_dir(self.out.folder, step)
    ckpt_lib.save_checkpoint(path, nnx.merge(self.graphdef, self.params), self.opt_state,
                             step=step, extra={"history": self.history})
    self.out.record(path.name)
    for gone in ckpt_lib.prune_checkpoints(self.out.folder, FLAGS.keep):
      self.out.forget(gone.name)
    self.out.write_json("metrics.json", {**self.summary(), "finished": False,
                                         "steps_done": step})
    print(f"saved {path}")


def train_loop(run: Run) -> None:
  """Steps ``run.start_step .. --steps`` with logging, evaluation and saving."""
  tokens_per_step = FLAGS.batch * FLAGS.seq_len
  t_log, n_log, first_interval = time.time(), 0, True
  for step in range(run.start_step, FLAGS.steps):
    tokens = batch_for_step(run.train, FLAGS.seed, step, FLAGS.batch, FLAGS.seq_len)
    run.params, run.opt_state, run.metrics = run.train_step(run.params, run.opt_state,
                                                            jnp.asarray(tokens))
    n_log += 1
    done = step + 1
    if done % FLAGS.log_every == 0 or done == FLAGS.steps:
      m = {k: float(v) for k, v in run.metrics.items()}
      dt = time.time() - t_log
      tps = n_log * tokens_per_step / dt
      if not first_interval:  # the first interval includes compilation
        run.train_time += dt
        run.train_tokens += n_log * tokens_per_step
      first_interval = False
      print(f"step {done:6d} loss {m['loss']:.4f} nll {m['nll']:.4f} "
            f"({m['nll'] / math.log(2):.3f} bits/byte) aux {m['aux_loss']:.3f} "
            f"gnorm {m['grad_norm']:.2f} lr {float(run.schedule(step)):.2e} tok/s {tps:,.0f}")
      if not all(map(math.isfinite, m.values())):
        raise app.UsageError(f"training diverged: non-finite metrics at step {done}: {m}; "
                             f"lower --lr or raise --warmup.")
      run.history.append({"step": done, **m, "tokens_per_sec": tps})
      t_log, n_log = time.time(), 0
    if FLAGS.eval_every and done % FLAGS.eval_every == 0 and done != FLAGS.steps:
      losses, _ = run.evaluator(run.params, run.eval_sets)
      print(f"  held-out bits/byte @ {done}: {fmt_losses(losses)}  "
            f"mean={np.mean(list(losses.values())) / math.log(2):.3f}")
      run.history.append({"step": done, "heldout_nats_per_byte": losses})
      t_log = time.time()
    if FLAGS.save_every and done % FLAGS.save_every == 0 and done != FLAGS.steps:
      run.save(done)
      t_log = time.time()


def setup(out: OutputFolder, cfg) -> Run:
  """Data, optimizer, model (fresh or resumed) and the jitted steps of the run."""
  compute_dtype = DTYPES[FLAGS.compute_dtype]
  print(f"devices: {jax.devices()}")
  print(f"model {cfg.name}: {cfg.total_params / 1e6:.2f} M params "
        f"({cfg.n_moe_layers} MoE layers x {cfg.n_experts} experts, top-{cfg.top_k})")
  train = corpus.load_corpus("train")
  heldout = corpus.load_corpus("heldout")
  print("train bytes: " + ", ".join(f"{k}={len(v):,}" for k, v in train.items()))
  eval_sets = {d: eval_windows(t, FLAGS.eval_windows, FLAGS.seq_len) for d, t in heldout.items()}
  tx, schedule = make_optimizer(FLAGS.lr, FLAGS.warmup, FLAGS.steps, FLAGS.min_lr_ratio,
                                FLAGS.weight_decay, FLAGS.clip)
  model, opt_state, start_step, history = (restore_run(out.folder, cfg, tx, compute_dtype)
                                           if FLAGS.resume else (None, None, 0, []))
  if model is None:
    model = MoETransformer(cfg, nnx.Rngs(FLAGS.seed), dtype=compute_dtype)
  graphdef, params = nnx.split(model)
  if opt_state is None:
    opt_state = tx.init(params)
  evaluator = Evaluator(graphdef, cfg.n_experts, max(1, min(FLAGS.batch, 64)))
  return Run(out, cfg, graphdef, schedule, make_train_step(graphdef, tx), evaluator, eval_sets,
             train, start_step, params, opt_state, history)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  t_start = time.time()
  check_flags()
  cfg = model_config(FLAGS.model)
  if FLAGS.seq_len > cfg.max_seq_len:
    raise app.UsageError(f"--seq_len={FLAGS.seq_len} exceeds max_seq_len={cfg.max_seq_len} of "
                         f"model {cfg.name!r}.")
  out = claim_folder(cfg)
  run = setup(out, cfg)
  train_loop(run)
  if run.start_step < FLAGS.steps:
    run.save(FLAGS.steps)
  heldout = corpus.load_corpus("heldout")
  final_sets = {d: eval_windows(t, FLAGS.final_eval_windows, FLAGS.seq_len)
                for d, t in heldout.items()}
  losses, counts = run.evaluator(run.params, final_sets)
  tv = routing_tv(counts)
  final_path = ckpt_lib.save_checkpoint(out.folder / "final", nnx.merge(run.graphdef, run.params),
                                        None, step=FLAGS.steps,
                                        dtype=DTYPES[FLAGS.param_dtype_save])
  out.record("final")
  wall = time.time() - t_start
  summary = run.summary()
  history = summary.pop("history")
  result = {
      **summary, "finished": True, "wall_time_s": wall,
      "heldout": {
          "windows_per_domain": {d: int(len(w)) for d, w in final_sets.items()},
          "nats_per_byte": losses,
          "bits_per_byte": {d: v / math.log(2) for d, v in losses.items()},
          "mean_bits_per_byte": float(np.mean(list(losses.values()))) / math.log(2),
      },
      "expert_tv_between_domains": tv,
      "expert_counts": {d: c.tolist() for d, c in counts.items()},
      "final_checkpoint": str(final_path),
      "history": history,
  }
  out.write_json("metrics.json", result)
  out.finish()
  mean_bpb = result["heldout"]["mean_bits_per_byte"]
  print(f"held-out bits/byte: {fmt_losses(losses)}  mean={mean_bpb:.3f}")
  for row in tv:
    print(f"  MoE layer {row['layer']}: TV between domains mean {row['mean']:.3f} "
          f"max {row['max']:.3f}")
  print(f"wrote {final_path} and {out.folder / 'metrics.json'} ({wall:.0f} s)")


if __name__ == "__main__":
  cli.run(main)

"""Train the small byte-level MoE language model on the five-domain corpus.

  python experiments/train_small_moe.py --config small_moe --steps 4000 --batch 64 --seq_len 256

Balanced batches over the domains (``moe_edge.workload.corpus.sample_batch``), AdamW with linear
warmup and cosine decay, global-norm clipping, load-balancing aux loss (``cfg.aux_loss_coef``).
Every ``--save_every`` steps an orbax checkpoint with the optimizer state goes to
``<ckpt_dir>/step_<N>`` (``--resume`` continues from the newest one; the batch of step N depends
only on ``--seed`` and N, so a resumed run sees the same data as an uninterrupted one). At the end:

  <ckpt_dir>/final          parameters only, in --param_dtype_save (bf16 by default)
  <ckpt_dir>/metrics.json   held-out loss per domain (nats/byte, bits/byte), command line, steps,
                            wall time, and per MoE layer the total-variation distance between the
                            domains' expert-activation distributions on held-out text.

Smoke test on CPU: ``--config tiny --steps 3 --batch 4 --seq_len 32 --ckpt_dir /tmp/t``.
"""
from __future__ import annotations

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
from moe_edge.model import checkpoint as ckpt_lib
from moe_edge.model.transformer import MoETransformer, lm_loss, token_losses
from moe_edge.workload import corpus

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small_moe", "Model preset under configs/models/.")
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
flags.DEFINE_integer("keep", 2, "Resumable step checkpoints to keep.")
flags.DEFINE_integer("eval_every", 500, "Held-out evaluation every N steps (0: only at the end).")
flags.DEFINE_integer("eval_windows", 32, "Held-out windows per domain for periodic evaluation.")
flags.DEFINE_integer("final_eval_windows", 256,
                     "Held-out windows per domain for the final evaluation (capped by the "
                     "number of non-overlapping windows the held-out text holds).")
flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in --ckpt_dir.")
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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  t_start = time.time()
  cfg = model_config(FLAGS.config)
  if FLAGS.seq_len > cfg.max_seq_len:
    raise app.UsageError(f"--seq_len={FLAGS.seq_len} exceeds max_seq_len={cfg.max_seq_len} of "
                         f"config {cfg.name!r}.")
  if FLAGS.steps < 1 or FLAGS.batch < 1:
    raise app.UsageError("--steps and --batch must be positive.")
  ckpt_dir = Path(FLAGS.ckpt_dir).resolve()
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  compute_dtype = DTYPES[FLAGS.compute_dtype]
  print(f"devices: {jax.devices()}")
  print(f"model {cfg.name}: {cfg.total_params / 1e6:.2f} M params "
        f"({cfg.n_moe_layers} MoE layers x {cfg.n_experts} experts, top-{cfg.top_k})")

  train = corpus.load_corpus("train")
  heldout = corpus.load_corpus("heldout")
  print("train bytes: " + ", ".join(f"{k}={len(v):,}" for k, v in train.items()))

  tx, schedule = make_optimizer(FLAGS.lr, FLAGS.warmup, FLAGS.steps, FLAGS.min_lr_ratio,
                                FLAGS.weight_decay, FLAGS.clip)
  model = MoETransformer(cfg, nnx.Rngs(FLAGS.seed), dtype=compute_dtype)
  opt_state, start_step = None, 0
  if FLAGS.resume:
    latest = ckpt_lib.latest_checkpoint(ckpt_dir)
    if latest is None:
      print(f"--resume: no checkpoint under {ckpt_dir}; starting from scratch.")
    else:
      model, opt_state, start_step = ckpt_lib.restore_checkpoint(latest, cfg, tx=tx,
                                                                 dtype=compute_dtype)
      if opt_state is None:
        raise ckpt_lib.CheckpointError(f"{latest} has no optimizer state; cannot resume.")
      print(f"resumed from {latest} at step {start_step}")
  graphdef, params = nnx.split(model)
  if opt_state is None:
    opt_state = tx.init(params)

  train_step = make_train_step(graphdef, tx)
  eval_batch = max(1, min(FLAGS.batch, 64))
  evaluator = Evaluator(graphdef, cfg.n_experts, eval_batch)
  eval_sets = {d: eval_windows(t, FLAGS.eval_windows, FLAGS.seq_len) for d, t in heldout.items()}

  def save(step: int):
    path = ckpt_lib.step_dir(ckpt_dir, step)
    ckpt_lib.save_checkpoint(path, nnx.merge(graphdef, params), opt_state, step=step)
    ckpt_lib.prune_checkpoints(ckpt_dir, FLAGS.keep)
    print(f"saved {path}")

  history = []
  tokens_per_step = FLAGS.batch * FLAGS.seq_len
  t_log, n_log, train_time, train_tokens = time.time(), 0, 0.0, 0
  metrics, first_interval = None, True
  for step in range(start_step, FLAGS.steps):
    tokens = batch_for_step(train, FLAGS.seed, step, FLAGS.batch, FLAGS.seq_len)
    params, opt_state, metrics = train_step(params, opt_state, jnp.asarray(tokens))
    n_log += 1
    done = step + 1
    if done % FLAGS.log_every == 0 or done == FLAGS.steps:
      m = {k: float(v) for k, v in metrics.items()}
      dt = time.time() - t_log
      tps = n_log * tokens_per_step / dt
      if not first_interval:  # the first interval includes compilation
        train_time += dt
        train_tokens += n_log * tokens_per_step
      first_interval = False
      print(f"step {done:6d} loss {m['loss']:.4f} nll {m['nll']:.4f} "
            f"({m['nll'] / math.log(2):.3f} bits/byte) aux {m['aux_loss']:.3f} "
            f"gnorm {m['grad_norm']:.2f} lr {float(schedule(step)):.2e} tok/s {tps:,.0f}")
      if not all(map(math.isfinite, m.values())):
        raise FloatingPointError(f"non-finite training metrics at step {done}: {m}; lower --lr "
                                 f"or raise --warmup.")
      history.append({"step": done, **m, "tokens_per_sec": tps})
      t_log, n_log = time.time(), 0
    if FLAGS.eval_every and done % FLAGS.eval_every == 0 and done != FLAGS.steps:
      losses, _ = evaluator(params, eval_sets)
      print(f"  held-out bits/byte @ {done}: {fmt_losses(losses)}  "
            f"mean={np.mean(list(losses.values())) / math.log(2):.3f}")
      history.append({"step": done, "heldout_nats_per_byte": losses})
      t_log = time.time()
    if FLAGS.save_every and done % FLAGS.save_every == 0 and done != FLAGS.steps:
      save(done)
      t_log = time.time()

  final_step = max(FLAGS.steps, start_step)
  if start_step < FLAGS.steps:
    save(final_step)
  model = nnx.merge(graphdef, params)
  final_sets = {d: eval_windows(t, FLAGS.final_eval_windows, FLAGS.seq_len)
                for d, t in heldout.items()}
  losses, counts = evaluator(params, final_sets)
  tv = routing_tv(counts)
  final_path = ckpt_lib.save_checkpoint(ckpt_dir / "final", model, None, step=final_step,
                                        dtype=DTYPES[FLAGS.param_dtype_save])
  wall = time.time() - t_start
  out = {
      "command": " ".join(shlex.quote(a) for a in sys.argv),
      "config": cfg.name,
      "total_params": cfg.total_params,
      "steps": final_step,
      "resumed_from_step": start_step if FLAGS.resume else None,
      "batch": FLAGS.batch, "seq_len": FLAGS.seq_len, "lr": FLAGS.lr, "warmup": FLAGS.warmup,
      "seed": FLAGS.seed, "compute_dtype": FLAGS.compute_dtype,
      "device": str(jax.devices()[0].device_kind),
      "wall_time_s": wall,
      "train_tokens_per_sec": train_tokens / train_time if train_time else None,
      "final_train_metrics": ({k: float(v) for k, v in metrics.items()}
                              if metrics is not None else None),
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
  (ckpt_dir / "metrics.json").write_text(json.dumps(out, indent=1))
  mean_bpb = out["heldout"]["mean_bits_per_byte"]
  print(f"held-out bits/byte: {fmt_losses(losses)}  mean={mean_bpb:.3f}")
  for row in tv:
    print(f"  MoE layer {row['layer']}: TV between domains mean {row['mean']:.3f} "
          f"max {row['max']:.3f}")
  print(f"wrote {final_path} and {ckpt_dir / 'metrics.json'} ({wall:.0f} s)")


if __name__ == "__main__":
  app.run(main)

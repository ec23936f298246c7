r"""Importance-driven substitution on real text: next-token loss vs communication and latency.

Setup (defaults): the trained ``small_moe`` (4 MoE layers, 16 experts, top-2) on ``edge_hetero_4``
(4 servers, 1 Gbit/s) with expert memory for ``copies 1.5`` full copies; server ``i`` serves
mostly domain ``DOMAINS[i]`` (share ``alpha``). The DanceMoE placement and the similarities are
computed from a *calibration* workload on the corpus' train split; the sweep runs on a disjoint
*held-out* workload.

For each threshold ``tau`` in ``thresholds`` and each similarity (``similarities``: ``output``
= routed mean cosine of expert outputs on the calibration hidden states, ``response`` = weight
based quadratic-response cosine, ``random`` = a no-information control) the model runs with
:func:`moe_edge.extensions.substitution.substitute` at every MoE layer (remote choices with gate
< ``tau`` replaced by the most similar local expert; ``scaled_similarities``: also with the
substitute's gate multiplied by its similarity); with ``drop`` it also runs the control that
simply skips those choices (``drop_renormalize``: rescale the kept gates); for each
``tolerances`` value it runs the local-preferring top-k. Every run reports the mean next-token NLL (nats/byte) overall and per
domain, the share of token-choices changed, and -- from the cost model on the transformed routing
-- local coverage, cross-server kB per token, expert energy per token and the decode latency per
step with the requests regrouped into decode steps of each ``decode_batches`` size (requests
per server per step; 1 = single-stream decoding as on an edge device).

Outputs in ``--out``: ``substitution_sweep.csv`` (one row per run), ``similarity_rank.csv``
(Spearman rho between the similarity matrices, per layer), ``substitution_summary.json`` (the
threshold that halves communication, by interpolation, and the loss change there) and
``substitution_sweep.png``.

Settings: ``configs/experiments/substitution_sweep.py`` (``--config.KEY=VALUE`` overrides)::

  python experiments/substitution_sweep.py            # about 4 minutes on two CPU cores
  python experiments/substitution_sweep.py --config.thresholds=0,0.2 --config.tolerances=0
  python experiments/substitution_sweep.py --replot   # redraw the PNG from the CSV in --out
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags

import _cli

from moe_edge.experiments.extension_settings import HarnessSettings, SubstitutionSweepConfig
from moe_edge.extensions import budgeted, harness, similarity, substitution
from moe_edge.extensions.transform import TransformedMoE
from moe_edge.model.transformer import expert_weights
from moe_edge.workload.corpus import DOMAINS

CONFIG = _cli.define_config("substitution_sweep")
OUT = flags.DEFINE_string("out", "results/extensions", "Output folder.")
REPLOT = flags.DEFINE_bool("replot", False, "Only redraw substitution_sweep.png from the CSV in "
                           "--out.")


def setup(h: HarnessSettings):
  """Model, cluster, placement, held-out workload and similarity matrices of the settings."""
  st = h.prepare()
  cfg = st.cfg
  w = expert_weights(st.model)
  ids = st.calib_trace.expert_ids.transpose(1, 0, 2)  # [L, T, k]
  sims = {
      "output": np.stack([similarity.output_similarity(
          st.calib_x[l], w["w_gate"][l], w["w_up"][l], w["w_down"][l],
          similarity.routed_weights(ids[l], cfg.n_experts)) for l in range(cfg.n_moe_layers)]),
      "response": similarity.layer_weight_similarity(w, "response"),
      "flat": similarity.layer_weight_similarity(w, "flat"),
      "random": similarity.random_similarity(cfg.n_moe_layers, cfg.n_experts, h.seed),
  }
  return cfg, st.model, st.origin, st.cluster, st.placement, st.heldout, sims


def rank_rows(sims: dict) -> list[dict]:
  """Spearman rho between the similarity kinds, per layer."""
  pairs = [("output", "response"), ("output", "flat"), ("response", "flat"),
           ("output", "random")]
  rows = []
  for l in range(sims["output"].shape[0]):
    rows.append(dict(layer=l, **{f"{a}_vs_{b}": similarity.rank_correlation(sims[a][l],
                                                                            sims[b][l])
                                 for a, b in pairs}))
  return rows


def run_row(cfg, cluster, placement, work, res, energy_cost, policy, sim_name, knob,
            out_sim, decode_batches) -> dict:
  """One CSV row: loss overall and per domain, substitution share, the mean output similarity
  (``out_sim [L, E, E]``) of the experts substituted for the originals, costs."""
  trace = harness.routing_trace(work, res.expert_ids, res.gates, cfg)
  layer = np.broadcast_to(np.arange(cfg.n_moe_layers)[None, None, :, None], res.changed.shape)
  ch = res.changed & (res.expert_ids != res.expert_ids_in)
  row = dict(policy=policy, similarity=sim_name, knob=knob, nll=float(res.nll.mean()),
             substituted_frac=float(res.changed.mean()),
             substitute_output_sim=float(out_sim[layer[ch], res.expert_ids_in[ch],
                                                 res.expert_ids[ch]].mean())
             if policy.startswith("substitute") and ch.any() else float("nan"))
  for i, db in enumerate(decode_batches):
    c = harness.cost_summary(trace, cfg, cluster, placement, db, energy_cost,
                             run=~res.changed.reshape(trace.expert_ids.shape)
                             if policy == "drop" else None)
    if i == 0:
      row.update(c)
    row[f"decode_ms_b{db}"] = c["decode_ms"]
  for d in DOMAINS:
    sel = work.domain == d
    row[f"nll_{d}"] = float(res.nll[sel].mean()) if sel.any() else float("nan")
  return row


def halving_point(rows: list[dict], base: dict) -> dict | None:
  """Threshold where cross-server bytes reach half the baseline (linear interpolation), and
  the loss change there; None when the sweep never halves them."""
  rows = sorted(rows, key=lambda r: r["knob"])
  comm = np.array([r["cross_kb_per_token"] for r in rows]) / base["cross_kb_per_token"]
  knob = np.array([r["knob"] for r in rows])
  dnll = np.array([r["nll"] for r in rows]) - base["nll"]
  lat = np.array([r["decode_ms"] for r in rows]) / base["decode_ms"]
  below = np.flatnonzero(comm <= 0.5)
  if below.size == 0:
    return None
  i = int(below[0])
  if i == 0:
    return dict(threshold=float(knob[0]), dnll=float(dnll[0]), latency_ratio=float(lat[0]))
  a = (comm[i - 1] - 0.5) / (comm[i - 1] - comm[i])
  lerp = lambda v: float(v[i - 1] + a * (v[i] - v[i - 1]))
  return dict(threshold=lerp(knob), dnll=lerp(dnll), latency_ratio=lerp(lat))


COLORS = {("substitute", "output"): "C0", ("substitute", "response"): "C1",
          ("substitute", "random"): "C2", ("substitute", "flat"): "C7",
          ("substitute_scaled", "output"): "C3", ("drop", ""): "C4", ("prefer_local", ""): "C5"}


def plot(rows: list[dict], base: dict, path: Path, drop_renormalize: bool) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
  groups = {}
  for r in rows:
    groups.setdefault((r["policy"], r["similarity"]), []).append(r)
  for (policy, sim), rs in groups.items():
    rs = sorted(rs, key=lambda r: r["knob"])
    k = np.array([r["knob"] for r in rs])
    dn = np.array([r["nll"] for r in rs]) - base["nll"]
    comm = np.array([r["cross_kb_per_token"] for r in rs]) / base["cross_kb_per_token"]
    lat = np.array([r["decode_ms"] for r in rs]) / base["decode_ms"]
    label = {"substitute": f"substitute ({sim} sim.)",
             "substitute_scaled": f"substitute ({sim} sim., gate x sim.)",
             "drop": "drop" + (" (renormalised)" if drop_renormalize else " (raw gates)"),
             "prefer_local": "local-preferring top-k (x: 1 - comm)"}[policy]
    style = {"substitute": "-o", "substitute_scaled": "-v", "drop": "-.^",
             "prefer_local": "--s"}[policy]
    color = COLORS.get((policy, sim), "k")
    if policy != "prefer_local":
      ax[0].plot(k, dn, style, label=label, ms=4, color=color)
      ax[1].plot(k, comm, style, label=f"bytes, {label}", ms=4, color=color)
      if (policy, sim) in (("substitute", "output"), ("drop", "")):
        ax[1].plot(k, lat, ":", label=f"decode latency, {label}", color=color)
    ax[2].plot(1 - comm, dn, style, label=label, ms=4, color=color)
  ax[0].set(xlabel="gate threshold", ylabel="delta NLL (nats/byte)",
            title="loss change vs threshold")
  ax[1].set(xlabel="gate threshold", ylabel="ratio to no substitution",
            title="cross-server bytes and decode latency")
  ax[1].axhline(0.5, color="grey", lw=0.8)
  ax[2].set(xlabel="share of cross-server bytes saved", ylabel="delta NLL (nats/byte)",
            title="quality vs communication saved")
  for a in (ax[0], ax[2]):
    a.set_yscale("symlog", linthresh=0.05)
  for a in ax:
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def read_csv(path: Path) -> list[dict]:
  """Rows written by :func:`write_csv`, numbers parsed back."""
  def parse(v):
    try:
      return float(v)
    except ValueError:
      return v
  with open(path, newline="") as fh:
    return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def write_csv(rows: list[dict], path: Path) -> None:
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  s = _cli.build(SubstitutionSweepConfig.from_flat, CONFIG.value.to_dict())
  h = s.harness
  t0 = time.perf_counter()
  out = Path(OUT.value)
  if REPLOT.value:
    rows = read_csv(out / "substitution_sweep.csv")
    for r in rows:
      r["similarity"] = "" if r["similarity"] in ("", None) else r["similarity"]
    base = next(r for r in rows if r["policy"] == "substitute" and r["knob"] == 0.0)
    plot(rows, base, out / "substitution_sweep.png", s.drop_renormalize)
    print(f"redrew {out}/substitution_sweep.png")
    return
  cfg, model, origin, cluster, placement, work, sims = setup(h)
  out.mkdir(parents=True, exist_ok=True)
  energy = budgeted.EnergyModel(h.pj_per_flop, h.nj_per_byte)
  energy_cost = budgeted.choice_cost_matrix(cfg, cluster, "energy", energy)
  hosts = placement.hosts
  print(f"model {cfg.name} ({origin}) on {cluster.name}: {placement.method} placement, "
        f"{int(hosts.sum())} experts hosted (capacity {cluster.expert_capacity(cfg).tolist()}); "
        f"held-out {work.tokens.shape[0]} requests x {work.seq_len} tokens")

  ranks = rank_rows(sims)
  write_csv(ranks, out / "similarity_rank.csv")
  print("Spearman rho between similarity matrices (off-diagonal pairs), per layer:")
  for r in ranks:
    print("  layer {layer}: ".format(**r) + ", ".join(f"{k} {v:+.2f}" for k, v in r.items()
                                                       if k != "layer"))

  sub_runner = harness.Runner(
      lambda server, t, knob: substitution.substitution_moe_fn(t["hosts"], t["sim"], server,
                                                               knob, record=True),
      h.batch_rows)
  scaled_runner = harness.Runner(
      lambda server, t, knob: substitution.substitution_moe_fn(t["hosts"], t["sim"], server,
                                                               knob, record=True,
                                                               scale_gates=True),
      h.batch_rows)
  rows = []
  runs = ([(x, sub_runner, "substitute") for x in s.similarities] +
          [(x, scaled_runner, "substitute_scaled") for x in s.scaled_similarities])
  for sim_name, runner, policy in runs:
    tables = dict(hosts=hosts, sim=sims[sim_name])
    for tau in s.thresholds:
      res = runner(model, work, tables, tau)
      rows.append(run_row(cfg, cluster, placement, work, res, energy_cost, policy,
                          sim_name, tau, sims["output"], s.decode_batches))
      print(f"  {sim_name:8s} tau={tau:.2f}: nll {rows[-1]['nll']:.4f}, "
            f"{policy}: substituted {rows[-1]['substituted_frac']:.3f} (output sim. "
            f"{rows[-1]['substitute_output_sim']:.2f}), coverage "
            f"{rows[-1]['coverage']:.3f}, {rows[-1]['cross_kb_per_token']:.3f} kB/token, "
            f"decode {rows[-1]['decode_ms']:.3f} ms/step")
  if s.drop:
    drop_runner = harness.Runner(
        lambda server, t, knob: TransformedMoE(
            substitution.drop_remote_transform(t["hosts"], server, knob, s.drop_renormalize),
            record=True),
        h.batch_rows)
    for tau in s.thresholds:
      res = drop_runner(model, work, dict(hosts=hosts), tau)
      rows.append(run_row(cfg, cluster, placement, work, res, energy_cost, "drop", "", tau,
                          sims["output"], s.decode_batches))
      print(f"  drop              tau={tau:.2f}: nll {rows[-1]['nll']:.4f}, dropped "
            f"{rows[-1]['substituted_frac']:.3f}, {rows[-1]['cross_kb_per_token']:.3f} kB/token")
  if s.tolerances:
    pref_runner = harness.Runner(
        lambda server, t, knob: substitution.local_preference_moe_fn(
            t["router"], t["hosts"], server, cfg.top_k, knob, cfg.norm_topk_prob, record=True),
        h.batch_rows)
    tables = dict(hosts=hosts, router=substitution.router_weights(model))
    for tol in s.tolerances:
      res = pref_runner(model, work, tables, tol)
      rows.append(run_row(cfg, cluster, placement, work, res, energy_cost, "prefer_local", "",
                          tol, sims["output"], s.decode_batches))
      print(f"  prefer_local tol={tol:.2f}: nll {rows[-1]['nll']:.4f}, changed "
            f"{rows[-1]['substituted_frac']:.3f}, coverage {rows[-1]['coverage']:.3f}, "
            f"{rows[-1]['cross_kb_per_token']:.3f} kB/token")
  write_csv(rows, out / "substitution_sweep.csv")

  base = next(r for r in rows if r["policy"] == "substitute" and r["knob"] == 0.0)
  summary = dict(
      command="python " + " ".join(sys.argv),
      model=cfg.name, weights=origin, cluster=cluster.name, placement=placement.method,
      heldout_tokens=int(work.tokens.shape[0] * work.seq_len), baseline=base,
      energy=dict(pj_per_flop=h.pj_per_flop, nj_per_byte=h.nj_per_byte),
      mean_rank_correlation={k: float(np.mean([r[k] for r in ranks])) for k in ranks[0]
                             if k != "layer"},
      halving={})
  print(f"baseline (no substitution): nll {base['nll']:.4f} nats/byte, coverage "
        f"{base['coverage']:.3f}, {base['cross_kb_per_token']:.3f} kB/token, decode "
        f"{base['decode_ms']:.3f} ms/step")
  curves = ([("substitute", x) for x in s.similarities] +
            [("substitute_scaled", x) for x in s.scaled_similarities] +
            ([("drop", "")] if s.drop else []))
  for policy, sim_name in curves:
    h = halving_point([r for r in rows if r["policy"] == policy
                       and r["similarity"] == sim_name], base)
    name = f"{policy}_{sim_name}" if sim_name else policy
    summary["halving"][name] = h
    if h is None:
      print(f"  {name}: communication never halves in this sweep")
    else:
      print(f"  {name}: bytes halve at threshold {h['threshold']:.3f}: delta NLL "
            f"{h['dnll']:+.4f} nats/byte ({100 * (np.exp(h['dnll']) - 1):+.2f}% perplexity), "
            f"decode latency x{h['latency_ratio']:.3f}")
  clean = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v
  summary["baseline"] = {k: clean(v) for k, v in base.items()}
  (out / "substitution_summary.json").write_text(json.dumps(summary, indent=1))
  plot(rows, base, out / "substitution_sweep.png", s.drop_renormalize)
  print(f"wrote {out}/substitution_sweep.csv, similarity_rank.csv, substitution_summary.json, "
        f"substitution_sweep.png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  _cli.run(main)

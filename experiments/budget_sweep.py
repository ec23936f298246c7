r"""Budgeted expert selection on real text: kept gate mass and next-token loss vs the budget.

Same set-up as ``experiments/substitution_sweep.py`` (trained ``small_moe`` on ``edge_hetero_4``,
DanceMoE placement fitted on a train-split calibration workload, held-out evaluation workload).
Every token, at every MoE layer, gets a budget (``kinds``: ``latency`` in seconds or ``energy``
in joules, per token and layer) and :func:`moe_edge.extensions.budgeted.budgeted_selection`
decides which of its top-k choices run, each on its cheapest replica (local compute vs link plus
remote compute, from the cluster and :class:`~moe_edge.extensions.budgeted.EnergyModel`).
Budgets are given in units of the mean cost of one remote token-choice (``budget_units``; the
per-kind unit is printed); ``inf`` keeps everything. Variants (``variants``): ``force`` /
``free`` (top-1 always runs, or may be dropped too) crossed with ``renorm`` / ``raw`` (kept
gates rescaled to the original mass, or not).

Per run: mean next-token NLL (nats/byte), kept share of the router's gate mass, share of
choices dropped, cost actually spent per token and layer, cross-server kB per token (dropped
choices are parked on local experts, so they move nothing), and whether the kept mass grew
monotonically with the budget. Offline, on the routing each run saw, the exact solver is run
next to the greedy to count where they differ; and on random instances (``instances`` per
``k``, costs from the cluster and synthetic uniform costs) the greedy's optimality rate and
worst ratio are measured for ``k`` = 2..8.

Outputs in ``--out``: ``budget_sweep.csv``, ``greedy_vs_exact.csv``, ``budget_summary.json`` and
``budget_sweep.png``.

Settings: ``configs/experiments/budget_sweep.py`` (``--config.KEY=VALUE`` overrides)::

  python experiments/budget_sweep.py                  # about 3 minutes on two CPU cores
  python experiments/budget_sweep.py --config.kinds=latency --config.solver=exact
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import _cli

from moe_edge.experiments.extension_settings import BudgetSweepConfig
from moe_edge.extensions import budgeted, harness

CONFIG = _cli.define_config("budget_sweep")
OUT = flags.DEFINE_string("out", "results/extensions", "Output folder.")


def unit_cost(cost_matrix: np.ndarray) -> float:
  """Mean cost of one remote token-choice (off-diagonal mean)."""
  n = cost_matrix.shape[0]
  return float(cost_matrix[~np.eye(n, dtype=bool)].mean())


def offline_gap(res, work, hosts, cm, budget, force) -> int:
  """Token-layers where greedy and exact keep different gate mass, on the routing ``res`` saw."""
  m, s, l, k = res.expert_ids_in.shape
  srv = jnp.asarray(np.repeat(work.server, s))
  diff = 0
  for li in range(l):
    ids = jnp.asarray(res.expert_ids_in[:, :, li].reshape(-1, k))
    g = jnp.asarray(res.gates_in[:, :, li].reshape(-1, k))
    cost, _ = budgeted.replica_costs(ids, srv, jnp.asarray(hosts[:, li]), jnp.asarray(cm))
    me = budgeted.kept_mass(g, budgeted.solve_exact(g, cost, budget, force))
    mg = budgeted.kept_mass(g, budgeted.solve_greedy(g, cost, budget, force))
    diff += int(np.sum(np.abs(np.asarray(me) - np.asarray(mg)) > 1e-6))
  return diff


def greedy_vs_exact(cm: np.ndarray, hosts: np.ndarray, instances: int, seed: int) -> list[dict]:
  """Greedy vs exact on random instances: costs from the cluster (random token servers and
  expert holders of the placement) and synthetic uniform costs."""
  rng = np.random.default_rng(seed)
  n, l, e = hosts.shape
  exact = jax.jit(budgeted.solve_exact, static_argnames=("force_top1",))
  greedy = jax.jit(budgeted.solve_greedy, static_argnames=("force_top1", "best_single"))
  rows = []
  for k in (2, 3, 4, 6, 8):
    logits = rng.normal(0.0, 2.0, (instances, e))
    top = np.argsort(-logits, axis=1)[:, :k]
    g = np.exp(np.take_along_axis(logits, top, axis=1))
    g = (g / g.sum(1, keepdims=True)).astype(np.float32)
    srv = rng.integers(0, n, instances)
    lay = rng.integers(0, l, instances)
    holders = hosts[:, lay[:, None], top].transpose(1, 2, 0)              # [I, k, N]
    cluster_cost = np.where(holders, cm[srv][:, None, :], np.inf).min(-1)
    costs = {"cluster": cluster_cost.astype(np.float32),
             "uniform": rng.uniform(0.05, 1.0, (instances, k)).astype(np.float32)}
    for name, c in costs.items():
      budget = (rng.uniform(0.0, 1.0, instances) * c.sum(1)).astype(np.float32)
      for force in (False, True):
        me = np.asarray(budgeted.kept_mass(g, exact(g, c, budget, force)))
        for best_single in (True, False):
          mg = np.asarray(budgeted.kept_mass(g, greedy(g, c, budget, force, best_single)))
          ratio = np.where(me > 0, mg / np.where(me > 0, me, 1.0), 1.0)
          rows.append(dict(k=k, costs=name, force_top1=force, best_single=best_single,
                           instances=instances, optimal_frac=float(np.mean(mg >= me - 1e-6)),
                           mean_ratio=float(ratio.mean()), min_ratio=float(ratio.min()),
                           never_better=bool(np.all(mg <= me + 1e-6))))
  return rows


def plot(rows: list[dict], path: Path, cfg: BudgetSweepConfig) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  kinds = sorted({r["kind"] for r in rows}, key=cfg.kinds.index)
  fig, ax = plt.subplots(len(kinds), 2, figsize=(11, 3.8 * len(kinds)), squeeze=False)
  for i, kind in enumerate(kinds):
    for v in cfg.variants:
      rs = sorted((r for r in rows if r["kind"] == kind and r["variant"] == v),
                  key=lambda r: r["budget_units"])
      finite = [r for r in rs if np.isfinite(r["budget_units"])]
      full = [r for r in rs if not np.isfinite(r["budget_units"])]
      x = [r["budget_units"] for r in finite]
      for j, key in enumerate(("kept_mass", "nll")):
        line = ax[i, j].plot(x, [r[key] for r in finite], "-o", ms=4, label=v,
                             drawstyle="steps-post")
        if full:
          ax[i, j].axhline(full[0][key], ls=":", color=line[0].get_color(), lw=1)
    unit = rows[[r["kind"] for r in rows].index(kind)]["unit"]
    u = f"{unit * 1e3:.3f} ms" if kind == "latency" else f"{unit * 1e6:.2f} uJ"
    for j, (lab, title) in enumerate((("kept share of gate mass", "kept gate mass"),
                                      ("NLL (nats/byte)", "next-token loss"))):
      ax[i, j].set(xlabel=f"{kind} budget per token and layer (1 = one remote choice = {u})",
                   ylabel=lab, title=f"{title} vs {kind} budget (dotted: no budget)")
      ax[i, j].grid(alpha=0.3)
      ax[i, j].legend(fontsize=8)
    ax[i, 1].set_yscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  sw = _cli.build(BudgetSweepConfig.from_flat, CONFIG.value.to_dict())
  h = sw.harness
  t0 = time.perf_counter()
  variants = {v: sw.parse_variant(v) for v in sw.variants}
  st = h.prepare()
  cfg, work, placement, hosts = st.cfg, st.heldout, st.placement, st.placement.hosts
  energy = budgeted.EnergyModel(h.pj_per_flop, h.nj_per_byte)
  cms = {kind: budgeted.choice_cost_matrix(cfg, st.cluster, kind, energy)
         for kind in budgeted.COST_KINDS}
  out = Path(OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  print(f"model {cfg.name} ({st.origin}) on {st.cluster.name}: {placement.method} placement; "
        f"held-out {work.tokens.shape[0]} requests x {work.seq_len} tokens")
  for kind, cm in cms.items():
    scale, u = (1e3, "ms") if kind == "latency" else (1e6, "uJ")
    print(f"  {kind} cost of one token-choice [from n, on m] ({u}):\n" + "\n".join(
        "    " + " ".join(f"{v * scale:9.5f}" for v in row) for row in cm))

  runners = {}
  for v, (force, renorm) in variants.items():
    runners[v] = harness.Runner(
        lambda server, t, knob, force=force, renorm=renorm: budgeted.budget_moe_fn(
            t["hosts"], t["cm"], server, knob, sw.solver, force, renorm, record=True),
        h.batch_rows)
  rows = []
  for kind in sw.kinds:
    cm = cms[kind]
    unit = unit_cost(cm)
    for v, (force, renorm) in variants.items():
      prev_mass = -1.0
      for bu in sw.budget_units:
        budget = bu * unit
        res = runners[v](st.model, work, dict(hosts=hosts, cm=cm), budget)
        keep = ~res.changed
        mass = float(np.where(keep, res.gates_in, 0.0).sum() / res.gates_in.sum())
        trace = harness.routing_trace(work, res.expert_ids, res.gates, cfg)
        costs = harness.cost_summary(trace, cfg, st.cluster, placement, sw.decode_batch,
                                     cms["energy"], run=keep.reshape(trace.expert_ids.shape))
        m, s, l, k = res.expert_ids_in.shape
        srv = np.repeat(work.server, s)
        spent = 0.0
        for li in range(l):
          c, _ = budgeted.replica_costs(jnp.asarray(res.expert_ids_in[:, :, li].reshape(-1, k)),
                                        jnp.asarray(srv), jnp.asarray(hosts[:, li]),
                                        jnp.asarray(cm))
          spent += float(np.where(keep[:, :, li].reshape(-1, k), np.asarray(c), 0.0).sum())
        row = dict(kind=kind, variant=v, force_top1=force, renormalize=renorm, budget_units=bu,
                   budget=budget, unit=unit, nll=float(res.nll.mean()), kept_mass=mass,
                   dropped_frac=float(res.changed.mean()),
                   spent_units_per_token_layer=spent / (m * s * l) / unit,
                   monotone=mass >= prev_mass - 1e-9,
                   greedy_exact_mismatch=offline_gap(res, work, hosts, cm, budget, force)
                   if sw.solver == "greedy" else 0,
                   **costs)
        prev_mass = mass
        rows.append(row)
        print(f"  {kind:7s} {v:12s} budget {bu:5.2f} units: nll {row['nll']:.4f}, kept mass "
              f"{mass:.3f}, dropped {row['dropped_frac']:.3f}, spent "
              f"{row['spent_units_per_token_layer']:.3f} units, "
              f"{row['cross_kb_per_token']:.3f} kB/token, greedy!=exact "
              f"{row['greedy_exact_mismatch']}")
  write_csv(rows, out / "budget_sweep.csv")

  gve = greedy_vs_exact(cms["latency"], hosts, sw.instances, h.seed)
  write_csv(gve, out / "greedy_vs_exact.csv")
  print("greedy vs exact on random instances (best_single on):")
  for r in gve:
    if r["best_single"]:
      print(f"  k={r['k']} {r['costs']:7s} force_top1={r['force_top1']!s:5s}: optimal in "
            f"{100 * r['optimal_frac']:.2f}% (mean ratio {r['mean_ratio']:.4f}, worst "
            f"{r['min_ratio']:.3f}), never better than exact: {r['never_better']}")
  summary = dict(
      command="python " + " ".join(sys.argv), model=cfg.name, weights=st.origin,
      cluster=st.cluster.name, placement=placement.method,
      heldout_tokens=int(work.tokens.shape[0] * work.seq_len), solver=sw.solver,
      energy=dict(pj_per_flop=h.pj_per_flop, nj_per_byte=h.nj_per_byte),
      units={kind: unit_cost(cms[kind]) for kind in sw.kinds},
      kept_mass_monotone=all(r["monotone"] for r in rows),
      greedy_exact_mismatches_on_text=int(sum(r["greedy_exact_mismatch"] for r in rows)),
      greedy_vs_exact_random=gve)
  (out / "budget_summary.json").write_text(json.dumps(summary, indent=1))
  plot(rows, out / "budget_sweep.png", sw)
  print(f"kept mass monotone in the budget for every variant: {summary['kept_mass_monotone']}; "
        f"greedy != exact on {summary['greedy_exact_mismatches_on_text']} token-layers of text")
  print(f"wrote {out}/budget_sweep.csv, greedy_vs_exact.csv, budget_summary.json, "
        f"budget_sweep.png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  _cli.run(main)

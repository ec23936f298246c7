r"""Robustness of the latency search: wins, ties and losses against the best baseline and prism.

Every (cluster, home family, alpha, seed) of the config (``moe_edge/experiments/robustness.py``
says what an instance and a family are): every baseline, prism and ``latency_search`` planned on
a profiling trace and costed on a separate evaluation trace. Outputs in ``--out``:
``robustness.csv`` (one row per instance: latency_search against the best baseline and prism,
on the evaluation trace and planned) and ``robustness_methods.csv`` (every method's latencies),
``robustness.md`` (the summary). Settings: ``configs/experiments/robustness.py``::

  python experiments/robustness.py                      # about 10-15 minutes on two CPU cores
  python experiments/robustness.py --config.seeds='(0,)' --config.clusters='("edge_hetero_4",)'
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

from absl import flags

import _cli

from moe_edge.experiments import robustness as rb
from moe_edge.experiments.tables import write_csv

CONFIG = _cli.define_config("robustness")
OUT = flags.DEFINE_string("out", "results/tables", "Output folder.")


def build(values) -> rb.RobustnessConfig:
  d = values.to_dict()
  d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  names = {f.name for f in dataclasses.fields(rb.RobustnessConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise rb.ConfigError(f"robustness: unknown keys {unknown}.")
  return rb.RobustnessConfig(**d)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  t0 = time.perf_counter()
  cfg = build(CONFIG.value)
  out = Path(OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  total = len(cfg.clusters) * len(cfg.families) * len(cfg.alphas) * len(cfg.seeds)
  for cluster in cfg.clusters:
    for family in cfg.families:
      for alpha in cfg.alphas:
        for seed in cfg.seeds:
          rows += rb.instance_rows(cfg, cluster, family, alpha, seed)
          done = len({(r["cluster"], r["family"], r["alpha"], r["seed"]) for r in rows})
          print(f"[{done}/{total}] {cluster} {family} alpha={alpha:g} seed={seed} "
                f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
  comp = rb.compare(rows, cfg)
  write_csv(comp, out / "robustness.csv")
  write_csv([{k: v for k, v in r.items() if k != "seconds"} for r in rows],
            out / "robustness_methods.csv")
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  md = [f"# Robustness of latency_search", "", f"Made by `{command}` ({total} instances, "
        f"{time.perf_counter() - t0:.0f} s).", ""] + rb.summary(comp, cfg)
  (out / "robustness.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  _cli.run(main)

"""Matplotlib figures of the tables and the ablation sweeps (PNG, Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_edge.placement import registry

#: Colours by role; a method takes its role's colours in registration order (cycling).
ROLE_COLORS = {"ours": ("tab:red", "tab:orange", "tab:pink", "tab:brown"),
               "paper": ("tab:green", "lime", "darkgreen"),
               "baseline": ("tab:gray", "tab:olive", "tab:blue", "tab:purple", "tab:cyan",
                            "navy", "goldenrod", "teal"),
               "oracle": ("black", "dimgray")}
OTHER_COLOR = "tab:green"  # a name no registered method has
FULL = "dancemoe_refined"  # the full method of the parts ablation
TABLE_FIGURES = (("decode_ms", "decode latency (ms / token)", "decode_latency.png"),
                 ("prefill_ms", "prefill latency (ms / request)", "prefill_latency.png"),
                 ("cross_kb_per_token", "cross-server kB / token", "cross_bytes.png"))
SWEEP_METRICS = (("decode_ms", "decode ms / token"), ("prefill_ms", "prefill ms / request"),
                 ("cross_kb_per_token", "cross-server kB / token"))


def _plt():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def method_color(method: str) -> str:
  """The colour of a registered method, derived from its role and registration order."""
  if method not in registry.names():
    return OTHER_COLOR
  role = registry.role(method)
  palette = ROLE_COLORS[role]
  return palette[registry.names(role).index(method) % len(palette)]


def _color(method: str) -> str:
  return method_color(method)


def plot_tables(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
  """One PNG per metric: a panel per model (rows) and cluster (columns), a bar per method."""
  plt = _plt()
  ok = [r for r in rows if r.get("status") == "ok"]
  models = list(dict.fromkeys(r["model"] for r in rows))
  clusters = list(dict.fromkeys(r["cluster"] for r in rows))
  paths = []
  for key, label, name in TABLE_FIGURES:
    fig, axes = plt.subplots(len(models), len(clusters), squeeze=False,
                             figsize=(4.2 * len(clusters), 2.4 * len(models)))
    for i, m in enumerate(models):
      for j, c in enumerate(clusters):
        ax = axes[i, j]
        here = [r for r in ok if r["model"] == m and r["cluster"] == c and r.get(key) is not None]
        x = np.arange(len(here))
        ax.bar(x, [r[key] for r in here], color=[_color(r["method"]) for r in here])
        ax.set_xticks(x, [r["method"] for r in here], rotation=35, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{m} on {c}", fontsize=8)
        if j == 0:
          ax.set_ylabel(label, fontsize=7)
        if here:
          lo = min(r[key] for r in here)
          hi = max(r[key] for r in here)
          ax.set_ylim(max(0.0, lo - 0.6 * (hi - lo + 1e-12)), hi + 0.15 * (hi - lo + 1e-12))
    fig.suptitle(f"{label} by placement method (y axes do not start at zero)", fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_sweep(rows: Sequence[dict], sweep: str, path: str | Path, x_label: str,
               log_x: bool = False) -> Path:
  """Lines of the sweep's metrics (rows of panels) against its value, per model (columns)."""
  plt = _plt()
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(len(SWEEP_METRICS), len(models), squeeze=False,
                           figsize=(4.6 * len(models), 2.6 * len(SWEEP_METRICS)), sharex=True)
  for j, m in enumerate(models):
    mine = [r for r in rows if r["model"] == m]
    for i, (key, label) in enumerate(SWEEP_METRICS):
      ax = axes[i, j]
      for method in dict.fromkeys(r["method"] for r in mine):
        pts = sorted((r["x"], r[key]) for r in mine if r["method"] == method and
                     r.get(key) is not None)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=method, color=_color(method),
                lw=2.0 if method.startswith("dancemoe") else 1.0)
      if log_x:
        ax.set_xscale("log")
      ax.tick_params(labelsize=7)
      if j == 0:
        ax.set_ylabel(label, fontsize=8)
      if i == 0:
        ax.set_title(m, fontsize=9)
      if i == len(SWEEP_METRICS) - 1:
        ax.set_xlabel(x_label, fontsize=8)
  axes[0, 0].legend(fontsize=6, loc="best")
  fig.suptitle(f"ablation: {sweep}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return Path(path)


def plot_parts(rows: Sequence[dict], path: str | Path) -> Path:
  """Bars: DanceMoE with each part switched off, per model and cluster, relative to the full
  method (``dancemoe_refined``)."""
  plt = _plt()
  keys = list(dict.fromkeys((r["model"], r["setting"]) for r in rows))
  variants = list(dict.fromkeys(r["method"] for r in rows))
  fig, axes = plt.subplots(1, len(SWEEP_METRICS), figsize=(4.8 * len(SWEEP_METRICS), 3.9))
  width = 0.8 / max(len(variants), 1)
  find = lambda m, c, v: next(r for r in rows if (r["model"], r["setting"], r["method"]) ==  # noqa
                              (m, c, v))
  for ax, (key, label) in zip(axes, SWEEP_METRICS):
    for v_i, v in enumerate(variants):
      vals = [find(m, c, v)[key] / find(m, c, FULL)[key] if find(m, c, FULL)[key]
              else math.nan for m, c in keys]
      ax.bar(np.arange(len(keys)) + v_i * width, vals, width, label=v,
             color=_color(v) if v in registry.names() else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2,
                  [f"{m}\n{c}" for m, c in keys], fontsize=6)
    ax.set_ylabel(f"{label}\nrelative to full DanceMoE", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(variants), fontsize=7)
  fig.suptitle("ablation: DanceMoE's parts switched off one at a time", fontsize=10)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return Path(path)


def plot_migration(rows: Sequence[dict], shifts: Sequence[int], path: str | Path) -> Path:
  """Per-interval decode latency and coverage of each migration policy."""
  plt = _plt()
  per = [r for r in rows if r.get("interval") is not None]
  fig, axes = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
  for policy in dict.fromkeys(r["method"] for r in per):
    mine = sorted((r for r in per if r["method"] == policy), key=lambda r: r["x"])
    xs = [r["x"] for r in mine]
    axes[0].plot(xs, [r["decode_ms"] for r in mine], marker="o", ms=3, label=policy)
    axes[1].plot(xs, [r["coverage"] for r in mine], marker="o", ms=3, label=policy)
  for ax in axes:
    for s in shifts:
      ax.axvline(s, color="k", ls=":", lw=0.8)
    ax.tick_params(labelsize=7)
  axes[0].set_ylabel("decode ms / token", fontsize=8)
  axes[1].set_ylabel("local coverage", fontsize=8)
  axes[1].set_xlabel("trace step at interval start (dotted: home domains swap)", fontsize=8)
  axes[0].legend(fontsize=7)
  fig.suptitle("ablation: migration under a drifting workload", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return Path(path)


def plot_extensions(rows: Sequence[dict], path: str | Path) -> Path:
  """The ``extensions`` sweep: bytes saved, decode latency ratio and loss change vs threshold,
  one line per policy (``subst``, ``drop``)."""
  plt = _plt()
  fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
  panels = (("bytes_saved", "cross-server bytes saved (share)"),
            ("latency_ratio", "decode latency / plain DanceMoE"),
            ("delta_nll", "delta NLL (nats/byte)"))
  for policy, style in (("subst", "-o"), ("drop", "--^")):
    mine = sorted((r for r in rows if r["method"] == policy), key=lambda r: r["x"])
    label = {"subst": "substitute (output sim.)", "drop": "drop (control)"}[policy]
    for a, (key, ylabel) in zip(ax, panels):
      a.plot([r["x"] for r in mine], [r[key] for r in mine], style, ms=4, label=label)
      a.set(xlabel="gate threshold tau", ylabel=ylabel)
  for a in ax:
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
  m = rows[0]
  fig.suptitle(f"{m['model']} on {m['cluster']}: routing extensions on the DanceMoE placement",
               fontsize=9)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

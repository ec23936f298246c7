"""Hostile data files for the battery's loader and script cases (phase two): activation traces,
placements, routing statistics, calibrations and occupied output folders, each built from a
real file written by the library's own saver and then damaged one way.

Importing this module registers its builders in :data:`hostile.BUILDERS`.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from hostile import builder
from moe_edge.config import model_config
from moe_edge.core.problem import Placement, slot_table
from moe_edge.core.routing_stats import RoutingStats
from moe_edge.core.trace import ActivationTrace
from moe_edge.cost.calibrate import Calibration
from moe_edge.io import OutputFolder, RunIdentity
from moe_edge.workload.requests import Requests

TINY = model_config("tiny")
T, N = 48, 4  # tokens, servers (edge_hetero_4)


def _trace_arrays(t: int = T) -> dict:
  """A valid ``tiny``-shaped trace: distinct top-k ids, gates renormalised to sum to one."""
  rng = np.random.default_rng(0)
  l, e, k = TINY.n_moe_layers, TINY.n_experts, TINY.top_k
  ids = np.argsort(rng.random((t, l, e)), axis=-1)[..., :k].astype(np.int32)
  g = rng.random((t, l, k)).astype(np.float32) + 0.1
  return dict(expert_ids=ids, gate_weights=(g / g.sum(-1, keepdims=True)).astype(np.float32),
              server=(np.arange(t) % N).astype(np.int32),
              request=(np.arange(t) // 4).astype(np.int32),
              position=(np.arange(t) % 4).astype(np.int32),
              step=(np.arange(t) // 8).astype(np.int32))


def _meta(**over) -> str:
  m = dict(model="tiny", num_experts=TINY.n_experts, num_servers=N, top_k=TINY.top_k,
           source="hostile", note="")
  m.update(over)
  return json.dumps(m)


def _raw_trace(d: Path, name: str = "trace.npz", drop=(), meta: str | None = None,
               **arrays) -> Path:
  """An ``.npz`` in the trace layout written with numpy directly (the saver validates)."""
  a = _trace_arrays()
  a.update(arrays)
  a["metadata"] = np.array(_meta() if meta is None else meta)
  out = d / name
  with open(out, "wb") as f:
    np.savez_compressed(f, **{k: v for k, v in a.items() if k not in drop})
  return out


# ---- traces ----------------------------------------------------------------------------------
@builder
def tr_valid(h, d):
  return ActivationTrace(**_trace_arrays(), model="tiny", num_experts=TINY.n_experts,
                         num_servers=N, source="hostile").save(d / "trace.npz")


@builder
def tr_truncated(h, d):
  raw = h.build("tr_valid").read_bytes()
  (d / "cut.npz").write_bytes(raw[: len(raw) // 2])
  return d / "cut.npz"


@builder
def tr_flipped(h, d):
  """Bytes flipped inside the compressed expert_ids member (CRC or zlib error on read)."""
  raw = bytearray(h.build("tr_valid").read_bytes())
  with zipfile.ZipFile(h.build("tr_valid")) as z:
    info = z.getinfo("expert_ids.npy")
  start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 8
  raw[start:start + 16] = bytes(b ^ 0xFF for b in raw[start:start + 16])
  (d / "flipped.npz").write_bytes(bytes(raw))
  return d / "flipped.npz"


@builder
def tr_zero_bytes(h, d):
  (d / "empty.npz").write_bytes(b"")
  return d / "empty.npz"


@builder
def tr_npy(h, d):
  np.save(d / "ids.npy", _trace_arrays()["expert_ids"])
  return d / "ids.npy"


@builder
def tr_text(h, d):
  (d / "notes.npz").write_text("expert_ids,gate_weights\n1,2\n")
  return d / "notes.npz"


@builder
def tr_no_metadata(h, d):
  return _raw_trace(d, drop=("metadata",))


@builder
def tr_meta_not_json(h, d):
  return _raw_trace(d, meta="model=tiny; top_k=2")


@builder
def tr_meta_no_model(h, d):
  return _raw_trace(d, meta=json.dumps(dict(num_experts=8, num_servers=N, top_k=2)))


@builder
def tr_meta_list(h, d):
  return _raw_trace(d, meta="[1, 2, 3]")


@builder
def tr_gates_x10(h, d):
  return _raw_trace(d, gate_weights=_trace_arrays()["gate_weights"] * 10)


@builder
def tr_gate_negative(h, d):
  g = _trace_arrays()["gate_weights"].copy()
  g[3, 1, 0] = -0.25
  return _raw_trace(d, gate_weights=g)


@builder
def tr_gate_sum(h, d):
  """Every gate <= 1, but token 5's two gates at layer 0 sum to 1.6."""
  g = _trace_arrays()["gate_weights"].copy()
  g[5, 0] = (0.8, 0.8)
  return _raw_trace(d, gate_weights=g)


@builder
def tr_empty(h, d):
  a = {k: v[:0] for k, v in _trace_arrays().items()}
  return _raw_trace(d, **a)


@builder
def tr_id_out_of_range(h, d):
  ids = _trace_arrays()["expert_ids"].copy()
  ids[2, 0, 1] = 9
  return _raw_trace(d, expert_ids=ids)


@builder
def tr_float_ids(h, d):
  return _raw_trace(d, expert_ids=_trace_arrays()["expert_ids"].astype(np.float32))


@builder
def tr_top_k_meta(h, d):
  return _raw_trace(d, meta=_meta(top_k=3))


@builder
def tr_server_out_of_range(h, d):
  return _raw_trace(d, meta=_meta(num_servers=2))


@builder
def tr_folder(h, d):
  (d / "trace.npz").mkdir()
  return d / "trace.npz"


# ---- placements (files; the invalid-content ones are in hostile.py) --------------------------
def _valid_placement(h) -> Path:
  return h.build("pl_valid_json")


@builder
def pl_valid_json(h, d):
  """2 servers, 1 layer, 2 experts, every server holding both (all routes local)."""
  hosts = np.ones((2, 1, 2), bool)
  route = np.broadcast_to(np.arange(2)[:, None, None], (2, 1, 2)).astype(np.int32)
  return Placement(hosts, route, slot_table(hosts), "hand").save(d / "placement.json")


@builder
def pl_corrupt_json(h, d):
  text = _valid_placement(h).read_text()
  (d / "placement.json").write_text(text[: len(text) // 2])
  return d / "placement.json"


@builder
def pl_json_list(h, d):
  (d / "placement.json").write_text("[[1, 0], [0, 1]]")
  return d / "placement.json"


@builder
def pl_json_no_route(h, d):
  p = json.loads(_valid_placement(h).read_text())
  del p["route"]
  (d / "placement.json").write_text(json.dumps(p))
  return d / "placement.json"


@builder
def pl_json_ragged(h, d):
  p = json.loads(_valid_placement(h).read_text())
  p["route"] = [[[0, 0]], [[1]]]
  (d / "placement.json").write_text(json.dumps(p))
  return d / "placement.json"


@builder
def pl_json_float_route(h, d):
  p = json.loads(_valid_placement(h).read_text())
  p["route"] = [[[0.5, 1.0]], [[0.0, 1.0]]]
  (d / "placement.json").write_text(json.dumps(p))
  return d / "placement.json"


@builder
def pl_json_hosts_2(h, d):
  p = json.loads(_valid_placement(h).read_text())
  p["hosts"][0][0][0] = 2
  (d / "placement.json").write_text(json.dumps(p))
  return d / "placement.json"


@builder
def pl_binary_json(h, d):
  (d / "placement.json").write_bytes(b"\xff\xfe\x00binary")
  return d / "placement.json"


@builder
def pl_valid_npz(h, d):
  return Placement.load(_valid_placement(h)).save(d / "placement.npz")


@builder
def pl_truncated_npz(h, d):
  raw = h.build("pl_valid_npz").read_bytes()
  (d / "placement.npz").write_bytes(raw[: len(raw) // 2])
  return d / "placement.npz"


@builder
def pl_no_slot_expert(h, d):
  p = Placement.load(_valid_placement(h))
  np.savez(d / "placement.npz", hosts=p.hosts, route=p.route, method=np.array("hand"),
           info=np.array("{}"))
  return d / "placement.npz"


@builder
def pl_txt(h, d):
  (d / "placement.txt").write_text(_valid_placement(h).read_text())
  return d / "placement.txt"


@builder
def pl_text_npz(h, d):
  (d / "placement.npz").write_text("hosts: all\n")
  return d / "placement.npz"


# ---- routing statistics ----------------------------------------------------------------------
@builder
def rs_valid(h, d):
  counts = np.random.default_rng(0).integers(0, 50, (2, 1, 4)).astype(np.int64)
  counts[..., 0] += 1
  st = RoutingStats(name="toy", path="", domains=("a", "b"), layers=(0,), num_layers=1,
                    num_experts=4, top_k=1, counts=counts)
  return st.save(d / "toy_domain_counts.npz")


@builder
def rs_truncated(h, d):
  raw = h.build("rs_valid").read_bytes()
  (d / "toy_domain_counts.npz").write_bytes(raw[: len(raw) // 3])
  return d / "toy_domain_counts.npz"


@builder
def rs_text(h, d):
  (d / "toy_domain_counts.npz").write_text("domain,count\n")
  return d / "toy_domain_counts.npz"


@builder
def rs_no_counts(h, d):
  with np.load(h.build("rs_valid")) as z:
    a = {k: z[k] for k in z.files if k != "counts"}
  np.savez(d / "toy_domain_counts.npz", **a)
  return d / "toy_domain_counts.npz"


@builder
def rs_string_top_k(h, d):
  with np.load(h.build("rs_valid")) as z:
    a = {k: z[k] for k in z.files}
  a["top_k"] = np.array("one")
  np.savez(d / "toy_domain_counts.npz", **a)
  return d / "toy_domain_counts.npz"


# ---- calibrations ----------------------------------------------------------------------------
@builder
def cal_valid(h, d):
  return Calibration(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0.8, 0.8, 0.8, 0.8])).save(
      d / "calibration.json")


@builder
def cal_not_json(h, d):
  text = h.build("cal_valid").read_text()
  (d / "calibration.json").write_text(text[:-7])
  return d / "calibration.json"


@builder
def cal_list(h, d):
  (d / "calibration.json").write_text("[0.5, 0.8]")
  return d / "calibration.json"


@builder
def cal_no_bw(h, d):
  c = json.loads(h.build("cal_valid").read_text())
  del c["bw_efficiency"]
  (d / "calibration.json").write_text(json.dumps(c))
  return d / "calibration.json"


@builder
def cal_negative(h, d):
  c = json.loads(h.build("cal_valid").read_text())
  c["flops_efficiency"][2] = -1.0
  (d / "calibration.json").write_text(json.dumps(c))
  return d / "calibration.json"


@builder
def cal_text_values(h, d):
  c = json.loads(h.build("cal_valid").read_text())
  c["bw_efficiency"] = "fast"
  (d / "calibration.json").write_text(json.dumps(c))
  return d / "calibration.json"


# ---- occupied output folders -----------------------------------------------------------------
def _other_run(d: Path, script: str, outputs: tuple[str, ...], manifest: str = "manifest.json"
               ) -> Path:
  """A folder holding ``outputs`` of a finished run of ``script`` with other settings."""
  out = OutputFolder.claim(d / "out", RunIdentity(script, {"colour": "red"}, 7), outputs,
                           manifest=manifest)
  for name in outputs:
    out.write_text(name, "old result\n")
  out.finish()
  return d / "out"


@builder
def place_other_run(h, d):
  return _other_run(d, "place", ("uniform_ep.json", "summary.json"))


@builder
def migration_other_run(h, d):
  return _other_run(d, "migration", ("intervals.csv", "summary.json"))


@builder
def tables_unrecorded(h, d):
  """A results folder as committed before manifests: a tables.csv no manifest records."""
  (d / "tables").mkdir()
  (d / "tables" / "tables.csv").write_text("model,cluster\n")
  (d / "tables" / "README.md").write_text("# hand-written\n")
  return d / "tables"


@builder
def an_npz_file(h, d):
  """An existing file where collect_traces.py would write its trace."""
  (d / "trace.npz").write_bytes(h.build("tr_valid").read_bytes())
  return d / "trace.npz"


# ---- request workloads -----------------------------------------------------------------------
def _requests():
  rng = np.random.default_rng(0)
  return Requests(server=np.array([0, 1, 0], np.int32), arrival_s=np.array([0.0, 0.5, 1.0]),
                  domain=("book", "c4", "book"),
                  prompts=tuple(rng.integers(0, 256, n).astype(np.int32) for n in (4, 3, 5)),
                  output_tokens=np.array([2, 3, 1], np.int32))


def _jsonl_lines(h) -> list[str]:
  return h.build("rq_valid_jsonl").read_text().splitlines()


def _write_lines(d: Path, lines: list[str], name: str = "requests.jsonl") -> Path:
  (d / name).write_text("\n".join(lines) + "\n")
  return d / name


@builder
def rq_valid_jsonl(h, d):
  return _requests().save(d / "requests.jsonl")


@builder
def rq_valid_npz(h, d):
  return _requests().save(d / "requests.npz")


@builder
def rq_cut_jsonl(h, d):
  lines = _jsonl_lines(h)
  return _write_lines(d, lines[:1] + [lines[1][: len(lines[1]) // 2]])


@builder
def rq_no_prompt(h, d):
  rows = [json.loads(x) for x in _jsonl_lines(h)]
  del rows[2]["prompt"]
  return _write_lines(d, [json.dumps(r) for r in rows])


@builder
def rq_string_server(h, d):
  rows = [json.loads(x) for x in _jsonl_lines(h)]
  rows[1]["server"] = "one"
  return _write_lines(d, [json.dumps(r) for r in rows])


@builder
def rq_unsorted(h, d):
  rows = [json.loads(x) for x in _jsonl_lines(h)]
  rows[2]["arrival_s"] = 0.25
  return _write_lines(d, [json.dumps(r) for r in rows])


@builder
def rq_zero_output(h, d):
  rows = [json.loads(x) for x in _jsonl_lines(h)]
  rows[0]["output_tokens"] = 0
  return _write_lines(d, [json.dumps(r) for r in rows])


@builder
def rq_blank(h, d):
  return _write_lines(d, ["", "   "])


@builder
def rq_zero_bytes(h, d):
  (d / "requests.jsonl").write_bytes(b"")
  return d / "requests.jsonl"


@builder
def rq_npz_truncated(h, d):
  raw = h.build("rq_valid_npz").read_bytes()
  (d / "requests.npz").write_bytes(raw[: len(raw) // 2])
  return d / "requests.npz"


@builder
def rq_npz_bad_offsets(h, d):
  with np.load(h.build("rq_valid_npz")) as z:
    a = {k: z[k] for k in z.files}
  a["prompt_offsets"] = np.array([0, 4, 2, 12])
  np.savez(d / "requests.npz", **a)
  return d / "requests.npz"


@builder
def rq_csv(h, d):
  (d / "requests.csv").write_text("server,arrival_s\n0,0.0\n")
  return d / "requests.csv"

"""The package's import graph: no cycle between moe_edge's modules (function-level imports
included), no function-level import of a moe_edge module, and core imports no layer above it
(docs/DESIGN.md, "Data flow")."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "moe_edge"

#: Function-level imports of moe_edge modules that remain where another lane rewrites the code
#: (branch ``mig``: placement/migration.py becomes moe_edge/migration/, and
#: sweeps.sweep_migration runs its replay pipeline); any other one fails the test.
REMAINING = {
    ("moe_edge/placement/migration.py", "moe_edge.cost.model"),
    ("moe_edge/placement/migration.py", "moe_edge.placement.objective"),
    ("moe_edge/placement/migration.py", "moe_edge.placement"),
    ("moe_edge/experiments/sweeps.py", "moe_edge.placement.migration"),
    ("moe_edge/experiments/sweeps.py", "moe_edge.placement"),
}
#: What ``moe_edge.core`` may import (besides itself): the layer below it.
CORE_MAY_IMPORT = ("moe_edge.config",)


def _module_name(path: Path, root: Path = ROOT) -> str:
  rel = path.relative_to(root.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
  return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
  """The moe_edge module ``name`` refers to (a module, or the package holding an attribute)."""
  while name and name not in known:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: Path, module: str, known: dict[str, Path]):
  """``[(target module, line, at module level)]`` of every import in ``path``."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
  top |= {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try))
          for c in ast.walk(n)}
  is_pkg = path.name == "__init__.py"
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = module if is_pkg else module.rpartition(".")[0]
        for _ in range(node.level - 1):
          pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
      names = [f"{base}.{a.name}" for a in node.names] or [base]
    for name in names:
      if name.split(".")[0] != "moe_edge":
        continue
      target = _resolve(name, known)
      if target is not None and target != module:
        out.append((target, node.lineno, id(node) in top))
  return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
  """``module -> modules it imports``. Importing ``a.b.c`` also runs the ``__init__`` of every
  package above it that is not the importer's own package (which has already run)."""
  known = _modules(root)
  graph: dict[str, set[str]] = {m: set() for m in known}
  for module, path in known.items():
    own = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for target, _, _ in _imports(path, module, known):
      graph[module].add(target)
      parent = target.rpartition(".")[0]
      while parent and parent != "moe_edge":
        if not (own == parent or own.startswith(parent + ".")) and parent in known:
          graph[module].add(parent)
        parent = parent.rpartition(".")[0]
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
  color = {m: 0 for m in graph}
  stack: list[str] = []

  def visit(m):
    color[m] = 1
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if color.get(t, 0) == 1:
        return stack[stack.index(t):] + [t]
      if color.get(t, 0) == 0:
        found = visit(t)
        if found:
          return found
    stack.pop()
    color[m] = 2
    return None

  for m in sorted(graph):
    if color[m] == 0:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_imports_of_moe_edge():
  known = _modules()
  bad = []
  for module, path in known.items():
    rel = str(path.relative_to(ROOT.parent))
    bad += sorted({f"{rel}:{line} imports {t}"
                   for t, line, at_top in _imports(path, module, known)
                   if not at_top and (rel, t) not in REMAINING})
  assert not bad, "function-level imports (move them to the top):\n" + "\n".join(bad)


def test_core_imports_no_layer_above_it():
  graph = import_graph()
  bad = {m: sorted(t for t in ts if not t.startswith("moe_edge.core")
                   and t not in CORE_MAY_IMPORT)
         for m, ts in graph.items() if m.startswith("moe_edge.core")}
  bad = {m: ts for m, ts in bad.items() if ts}
  assert not bad, f"moe_edge.core imports layers above it: {bad}"


def _write(root: Path, files: dict[str, str]) -> Path:
  for rel, text in files.items():
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
  return root / "moe_edge"


@pytest.mark.parametrize("files,expect", [
    ({"moe_edge/__init__.py": "", "moe_edge/a.py": "from moe_edge import b\n",
      "moe_edge/b.py": "def f():\n  from moe_edge.a import x\n"}, ["moe_edge.a", "moe_edge.b"]),
    ({"moe_edge/__init__.py": "", "moe_edge/p/__init__.py": "from moe_edge.p import m\n",
      "moe_edge/p/m.py": "from moe_edge.q import y\n", "moe_edge/q.py": "import moe_edge.p.m\n"},
     ["moe_edge.p.m", "moe_edge.q"]),
    ({"moe_edge/__init__.py": "", "moe_edge/p/__init__.py": "from moe_edge.p import m\n",
      "moe_edge/p/m.py": "from moe_edge.p import n\n", "moe_edge/p/n.py": ""}, None),
])
def test_the_walker_finds_cycles(tmp_path, files, expect):
  """A cycle hidden in a function (case 1) and one through a package's __init__ (case 2) are
  found; a package importing its own submodules (case 3) is not a cycle."""
  cycle = find_cycle(import_graph(_write(tmp_path, files)))
  if expect is None:
    assert cycle is None
  else:
    assert cycle is not None and set(expect) <= set(cycle), cycle

"""The project's import layering, checked statically with `ast` (nothing is imported, so this runs in well under a second).

Packages, lowest layer first: `extract` (its CONTRACT modules are the stable API the others build on), `heads`,
`ahflows` (the workflows), `ahbench`, `ahcli` (the command line, the top). The rules:

1. `extract` never imports `heads`, `ahflows`, `ahcli` or `ahbench`.
2. A CONTRACT module of `extract` imports, from the project, only other CONTRACT modules.
3. `heads` imports, from the project, only `heads.*` and the CONTRACT modules of `extract`.
4. `ahflows` never imports `ahcli` or `ahbench`.
5. Only `ahcli` imports `ahcli`; only `ahbench` and `ahcli` (the bench command) import `ahbench`.
6. No import cycle among the project's modules.
7. No name starting with `_` is imported from another module of the project (dunder names are fine).
8. No function-local import of a project module (they hide cycles); function-local imports are for heavy optional
   third-party libraries only.

Every import statement counts: module level, inside functions, under `if TYPE_CHECKING:`, in try/except. Relative
imports are resolved against the importing module. `from pkg import name` counts as importing the module `pkg.name`
when that module exists in the tree (so `from extract import store` imports `extract.store`), otherwise as importing
`pkg`; a package's `__init__.py` is the module `pkg`. Dynamic imports (`importlib.import_module`) are not seen.

`violations(root)` is a pure function over a source tree; the tests below run it on the real tree and on small fake
trees that each break one rule, to show the checker can fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

# The stable API of `extract`: what `heads` (and the contract itself) may import from it.
CONTRACT = frozenset({
    "extract.errors", "extract.vocab", "extract.spec", "extract.files", "extract.provenance", "extract.record",
    "extract.store", "extract.store_backends", "extract.faults", "extract.locks", "extract.listing",
    "extract.devices", "extract.precision", "extract.zarr_raw", "extract.host_memory", "extract.value_scan",
})
PACKAGES = ("extract", "heads", "ahflows", "ahcli", "ahbench")
SKIP_DIRS = frozenset({"tests", ".venv", "build", "__pycache__"})

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------- scanning

def _discover(root: Path) -> dict[str, Path]:
    """module name -> file, for every .py file of the five packages directly under `root` (missing ones skipped)."""
    modules: dict[str, Path] = {}
    for pkg in PACKAGES:
        pkg_dir = root / pkg
        if not pkg_dir.is_dir():
            continue
        for path in sorted(pkg_dir.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _is_project(name: str) -> bool:
    return _top(name) in PACKAGES


class _ImportCollector(ast.NodeVisitor):
    """Every Import / ImportFrom node of a module, with whether it sits inside a function."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._depth = 0

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self._depth > 0))


def _resolve_from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module named by `from <...> import`, relative levels resolved; None if it escapes the tree."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        return None  # `from .. import x` above the top-level package
    base = package[: len(package) - (node.level - 1)]
    if node.module:
        base = base + node.module.split(".")
    return ".".join(base)


def _longest_known(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


# ------------------------------------------------------------------------------------------------------------- rules

def _layer_reasons(importer: str, target: str) -> list[str]:
    """Why `importer` may not import the project module `target` (rules 1-5); [] when it may."""
    src, dst = _top(importer), _top(target)
    reasons: list[str] = []
    if src == "extract" and dst in ("heads", "ahflows", "ahcli", "ahbench"):
        reasons.append(f"extract must not import {dst}")
    if importer in CONTRACT and target not in CONTRACT:
        reasons.append(f"not a contract module; contract module {importer} may import only contract modules")
    if src == "heads" and dst != "heads" and target not in CONTRACT:
        if dst == "extract":
            reasons.append("not a contract module")
        else:
            reasons.append("heads may import only heads.* and the contract modules of extract")
    if src == "ahflows" and dst in ("ahcli", "ahbench"):
        reasons.append(f"ahflows must not import {dst}")
    if dst == "ahcli" and src != "ahcli":
        reasons.append("only ahcli may import ahcli")
    if dst == "ahbench" and src not in ("ahbench", "ahcli"):
        reasons.append("only ahbench and ahcli may import ahbench")
    return reasons


def _find_cycle(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through `start` inside one strongly connected component (BFS)."""
    parent: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if succ not in seen:
                    seen.add(succ)
                    parent[succ] = node
                    nxt.append(succ)
        frontier = nxt
    return [start, start]  # unreachable for a component of two or more modules


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """(one cycle as a closed path of modules, all modules of its component) per non-trivial strongly connected
    component of the graph (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, succs = work[-1]
            advanced = False
            for succ in succs:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return sorted(((_find_cycle(min(c), c, graph), c) for c in components), key=lambda pair: pair[0][0])


def violations(root: Path) -> list[str]:
    """Human-readable layering violations of the source tree under `root`, one line each; [] when clean."""
    root = Path(root)
    modules = _discover(root)
    known = set(modules)
    lines: list[tuple[str, int, str]] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    edge_sites: dict[tuple[str, str], str] = {}

    for module, path in sorted(modules.items()):
        rel = path.relative_to(root).as_posix()
        is_package = path.name == "__init__.py"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            lines.append((rel, getattr(exc, "lineno", None) or 0, f"cannot be parsed ({exc.__class__.__name__}: {exc})"))
            continue
        collector = _ImportCollector()
        collector.visit(tree)
        for node, local in collector.found:
            # target module -> private names imported from it (for rule 7)
            targets: dict[str, list[str]] = {}
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.setdefault(alias.name, [])
            else:
                base = _resolve_from_base(module, is_package, node)
                if base is None:
                    lines.append((rel, node.lineno, f"relative import (level {node.level}) escapes the project"))
                    continue
                if base == "__future__":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    if alias.name != "*" and sub in known:
                        targets.setdefault(sub, [])  # `from pkg import module`: a module, not a name
                    else:
                        private = alias.name.startswith("_") and not (
                            alias.name.startswith("__") and alias.name.endswith("__"))
                        targets.setdefault(base, []).extend([alias.name] if private else [])
            for target, private_names in targets.items():
                if not _is_project(target):
                    continue
                reasons = [] if target == module else _layer_reasons(module, target)
                if private_names and target != module:
                    reasons.append("private name(s) " + ", ".join(private_names) + " imported across modules")
                if local:
                    reasons.append("inside a function: function-local imports of project modules are forbidden")
                if reasons:
                    lines.append((rel, node.lineno, f"imports {target} ({'; '.join(reasons)})"))
                resolved = _longest_known(target, known)
                if resolved is not None and resolved != module:
                    graph[module].add(resolved)
                    edge_sites.setdefault((module, resolved), f"{rel}:{node.lineno}")

    out = [f"{rel}:{lineno} {text}" for rel, lineno, text in sorted(set(lines))]
    for cycle, component in _cycles(graph):
        sites = ", ".join(edge_sites[(a, b)] for a, b in zip(cycle, cycle[1:]))
        line = f"import cycle: {' -> '.join(cycle)} (at {sites})"
        if len(component) > len(cycle) - 1:
            line += f"; {len(component)} modules import each other in a loop: {', '.join(sorted(component))}"
        out.append(line)
    return out


# ------------------------------------------------------------------------------------------------------------- tests

def test_the_project_keeps_its_layers() -> None:
    found = violations(REPO)
    assert found == [], f"{len(found)} layering violation(s):\n" + "\n".join(found)


# A minimal tree that keeps every rule: relative path -> source.
CLEAN_TREE = {
    "extract/__init__.py": "",
    "extract/errors.py": "class AHError(Exception):\n    pass\n",
    "extract/store.py": (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from extract.errors import AHError\n"
        "from . import faults\n"
        "if TYPE_CHECKING:\n"
        "    from extract.spec import Spec\n"
        "def open_store():\n"
        "    import h5py  # heavy optional third-party library: fine\n"
        "    return h5py\n"
    ),
    "extract/faults.py": "def fault_point(name):\n    return None\n",
    "extract/spec.py": "class Spec:\n    pass\n",
    "extract/bah.py": "from extract.store import open_store\nfrom extract.spec import Spec\n",
    "extract/synth.py": "import numpy\n",
    "heads/__init__.py": "",
    "heads/data.py": "from extract import store\nimport extract.errors\nfrom extract.faults import fault_point\n",
    "heads/train.py": "from heads.data import store\nfrom .data import fault_point\n",
    "ahflows/__init__.py": "",
    "ahflows/run.py": "import extract.bah\nfrom heads import train\n",
    "ahbench/__init__.py": "",
    "ahbench/run.py": "from ahflows.run import extract\nimport heads.train\n",
    "ahbench/io.py": "import json\n",
    "ahcli/__init__.py": "",
    "ahcli/app.py": "import ahbench.run\nfrom ahcli import cmd\nfrom ahflows import run\n",
    "ahcli/cmd.py": "import numpy\nfrom ahcli import __version__\n",
    # not scanned: outside the five packages, or in a skipped directory
    "tests/test_x.py": "import ahcli.app\nfrom extract.bah import _private\n",
    "heads/build/junk.py": "import ahcli\n",
    "heads/.venv/lib.py": "import ahcli\n",
}

# rule -> (files changed from CLEAN_TREE, substring the report must contain)
BROKEN_TREES = {
    "1 extract imports heads": (
        {"extract/bah.py": "import heads.data\n"},
        "extract/bah.py:1 imports heads.data (extract must not import heads",
    ),
    "2 contract imports non-contract": (
        {"extract/errors.py": "from . import synth\n"},  # relative, resolved to extract.synth
        "extract/errors.py:1 imports extract.synth (not a contract module; contract module extract.errors",
    ),
    "3 heads imports non-contract extract": (
        {"heads/data.py": "import extract.errors\nfrom extract import bah\n"},
        "heads/data.py:2 imports extract.bah (not a contract module)",
    ),
    "4 ahflows imports ahbench": (
        {"ahflows/run.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ahbench.io import X\n"},
        "ahflows/run.py:3 imports ahbench.io (ahflows must not import ahbench",
    ),
    "5 ahbench imports ahcli": (
        {"ahbench/run.py": "from ahcli.cmd import main\n"},
        "ahbench/run.py:1 imports ahcli.cmd (only ahcli may import ahcli)",
    ),
    "6 import cycle": (
        {"extract/errors.py": "from extract import faults\n", "extract/faults.py": "import extract.spec\n",
         "extract/spec.py": "from .errors import AHError\n"},
        "import cycle: extract.errors -> extract.faults -> extract.spec -> extract.errors",
    ),
    "7 private name across modules": (
        {"heads/train.py": "from heads.data import _helper, __version__\n"},
        "heads/train.py:1 imports heads.data (private name(s) _helper imported across modules)",
    ),
    "8 function-local project import": (
        {"ahcli/cmd.py": "import numpy\ndef main():\n    import torch\n    from ahflows.run import train\n"},
        "ahcli/cmd.py:4 imports ahflows.run (inside a function",
    ),
}


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_clean_tree_has_no_violation(tmp_path: Path) -> None:
    assert violations(_write_tree(tmp_path, CLEAN_TREE)) == []


@pytest.mark.parametrize("case", sorted(BROKEN_TREES), ids=lambda case: "rule " + case)
def test_each_broken_rule_is_reported(tmp_path: Path, case: str) -> None:
    changes, expected = BROKEN_TREES[case]
    found = violations(_write_tree(tmp_path, {**CLEAN_TREE, **changes}))
    assert found, f"rule {case}: nothing reported"
    assert any(expected in line for line in found), f"rule {case}: {expected!r} not in:\n" + "\n".join(found)
    # each fake tree breaks only its own rule: no noise from the rest of the tree
    assert len(found) == 1, f"rule {case}: expected one report, got:\n" + "\n".join(found)

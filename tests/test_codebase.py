"""Checks on the code itself: no import cycles, no private names used across modules. (Design-doc
citations and the paths the docs name are checked by tests/test_docs.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlmem", "rewards")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (module level and inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, m, modules) for m, p in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle of concepts
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    imported: set[str] = set()
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES + ("train_helpers",):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {a.name}")
                imported.add(a.asname or a.name)
            if any(part.startswith("_") and not part.startswith("__") for part in (node.module or "").split(".")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: private module {node.module}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    imported.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return bad


def test_no_private_names_used_across_modules():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + list((ROOT / "tests").rglob("*.py"))
    bad = [b for f in files for b in _private_uses(f)]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _dtype_tables(path: Path) -> list[str]:
    """Collection literals (tuple, list, set, dict keys, Literal[...]) naming two or more dtypes."""
    from rlmem.dtypes import TABLE

    names = {d.name for d in TABLE} | {a for d in TABLE for a in d.aliases}
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elts = node.elts
        elif isinstance(node, ast.Dict):
            elts = [k for k in node.keys if k is not None]
        else:
            continue
        hits = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
        if len(hits) >= 2:
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {sorted(hits)}")
    return bad


def test_one_dtype_table():
    """Dtype names, their torch dtypes and tolerances are listed once, in rlmem/dtypes.py; every
    other module imports its names (LEARNER_DTYPES, MODEL_DTYPES, canonical, torch_dtype)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p != ROOT / "rlmem" / "dtypes.py"]
    bad = [b for f in files for b in _dtype_tables(f)]
    assert not bad, "dtype lists outside rlmem/dtypes.py:\n" + "\n".join(bad)


def _jsonl_loops(path: Path) -> list[str]:
    """``json.loads`` of a loop variable: a file parsed line by line outside rlmem/jsonl.py."""
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.For):
            targets, body = [node.target], node.body
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            targets, body = [g.target for g in node.generators], [node]
        else:
            continue
        names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        for b in body:
            for c in ast.walk(b):
                if (isinstance(c, ast.Call) and ast.unparse(c.func) in ("json.loads", "loads") and c.args
                        and isinstance(c.args[0], ast.Name) and c.args[0].id in names):
                    bad.append(f"{path.relative_to(ROOT)}:{c.lineno}")
    return sorted(set(bad))


def test_one_jsonl_reader():
    """Every JSON-lines file is read by rlmem/jsonl.py (file:line errors, UTF-8, objects, torn tails)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p != ROOT / "rlmem" / "jsonl.py"]
    bad = [b for f in files for b in _jsonl_loops(f)]
    assert not bad, "JSON lines parsed outside rlmem/jsonl.py:\n" + "\n".join(bad)


def test_every_module_imports_first():
    """Each module imports as the first rlmem module of a process: a cycle through a package's
    ``__init__`` (``rlmem.metrics`` -> ``rlmem.eviction`` -> ``record`` -> ``rlmem.metrics``) shows
    only then, as a partially initialized module."""
    import subprocess
    import sys

    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('rlmem', 'rewards')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        if 'partially initialized' in str(e) or 'circular' in str(e):\n"
        "            print(f'{name}: {e}')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not out.stdout.strip(), "import cycles through a package __init__:\n" + out.stdout


# The layers of docs/design.md section 3, lowest first: a module may import its own layer and the
# ones below, never one above. The core (policy, engines, data, rewards, evaluation) knows nothing of
# training; the learner knows nothing of runs; the run directory knows nothing of the driver.
LAYERS = [
    ("core", ("rewards", "rlmem.dtypes", "rlmem.dirlock", "rlmem.jsonl", "rlmem.metrics", "rlmem.figures", "rlmem.eviction",
              "rlmem.models", "rlmem.data", "rlmem.engine", "rlmem.evaluation", "rlmem.toy",
              "rlmem.devices", "rlmem.collectives", "rlmem.ports")),
    ("learner", ("rlmem.learner",)),
    ("run", ("rlmem.run",)),
    ("train", ("rlmem.train",)),
    ("serving", ("rlmem.serving",)),
    ("entry points", ("rlmem.commands", "rlmem.bench", "rlmem.cli")),
]


def _layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer of LAYERS: place it there (docs/design.md section 3)")


def test_no_module_imports_a_layer_above_its_own():
    modules = _modules()
    bad = []
    for m, path in modules.items():
        if m == "rlmem":
            continue
        for d in _imports(path, m, modules):
            if d != "rlmem" and _layer(d) > _layer(m):
                bad.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
    assert not bad, "imports running up the layers:\n" + "\n".join(sorted(bad))


def test_the_driver_package_stays_small():
    """rlmem/train holds the orchestration only; it once held a third of the package (issue: layout re-cut)."""
    def lines(paths) -> int:
        return sum(len(p.read_text().splitlines()) for p in paths)

    total = lines((ROOT / "rlmem").rglob("*.py"))
    train = lines((ROOT / "rlmem" / "train").rglob("*.py"))
    assert train <= 0.25 * total, f"rlmem/train is {train}/{total} lines ({train / total:.0%}), above 25%"


# Modules whose tensor collectives must go through rlmem/collectives.py (it puts the tensors on the
# process group's device: NCCL takes CUDA tensors only, so a CPU torch.tensor([...]) fails on GPUs).
_DIST_MODULES = ("torch.distributed", "deepspeed.comm")


def _collective_calls(path: Path) -> list[str]:
    """Uses of a torch.distributed / deepspeed.comm collective (rlmem.collectives.COLLECTIVES):
    ``dist.all_reduce`` through any alias, ``torch.distributed.barrier``, importing the function, or
    a standalone process group's option class (``dist.BroadcastOptions``: ``pg.broadcast([t], opts)``)."""
    from rlmem.collectives import COLLECTIVES, OPTION_CLASSES

    COLLECTIVES = COLLECTIVES | OPTION_CLASSES

    tree = ast.parse(path.read_text(), str(path))
    aliases = set(_DIST_MODULES)    # dotted spellings always count
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in _DIST_MODULES and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in _DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in _DIST_MODULES and a.name in COLLECTIVES:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_collectives_go_through_one_helper():
    """No module but rlmem/collectives.py calls a torch.distributed (or deepspeed.comm) collective."""
    helper = ROOT / "rlmem" / "collectives.py"
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p != helper]
    bad = [b for f in files for b in _collective_calls(f)]
    assert not bad, "collectives outside rlmem/collectives.py (use its all_reduce / broadcast / barrier):\n" \
        + "\n".join(bad)
    # the scan sees what it is meant to see: the helper itself calls them
    assert {b.split(": ", 1)[1] for b in _collective_calls(helper)} >= {"dist.all_reduce", "dist.broadcast",
                                                                        "dist.barrier", "dist.BroadcastOptions"}

"""The docs are true where a machine can tell.

1. Every repository path that README.md, launch/README.md and docs/*.md name exists: paths in code
   spans and fenced blocks that start with a top-level folder of the repository (``rlmem/``,
   ``configs/``, ...), with a ``::name`` suffix checked to be defined in that file, and every relative
   markdown link. A source file named from somewhere else (``engine/base.py``) cannot be checked, or
   found by a reader, so it fails too. Run outputs (``outputs/...``, ``runs/...``) start with no such folder and are skipped.
2. Every citation of docs/design.md in the code, configs, scripts and docs resolves: "section N"
   is one of its numbered sections, and a named part, quoted (``section 1, "Replay mask"``) or
   closing a parenthesis (``(docs/design.md, Losses)``), is a heading or a bold paragraph title there
   (of section N, when N is given). Design notes outside the repository are not cited: a bare upper-case ``NAME.md`` must be
   a file at the repository root.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
ROOTS = ("rlmem", "rewards", "configs", "scripts", "tests", "docs", "launch", "models", ".ci")
SOURCE_DIRS = ("rlmem", "rewards", "configs", "scripts", "tests", "launch", "docs", ".ci")
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".md"}

_PATH = re.compile(r"(?<![\w/.~$<>-])(?:%s)/[A-Za-z0-9_./*-]*(?:::[A-Za-z_][\w.]*)?"
                   % "|".join(re.escape(r) for r in ROOTS))
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_CITE = re.compile(r"docs/design\.md(?:\s+section\s+(?P<sec>\d+))?"
                   r"(?:(?:,\s*|\s+)\"(?P<quoted>[^\"\n]+)\"|,\s*(?P<bare>[A-Za-z][^,.;:)\"`\n]*)(?=\)))?")
_RELATIVE_SOURCE = re.compile(r"(?<![\w/.~$<>-])[A-Za-z_][\w-]*/[\w/.-]*\.(?:py|yaml|sh)\b")
_UPPER_MD = re.compile(r"(?<![\w/.-])([A-Z][A-Z0-9_-]+\.md)\b")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "launch" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def source_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for d in SOURCE_DIRS:
        files += [p for p in sorted((ROOT / d).rglob("*")) if p.is_file() and p.suffix in SOURCE_SUFFIXES
                  and "__pycache__" not in p.parts]
    return [f for f in files if f.exists()]


def named_paths(text: str) -> set[str]:
    """Repository paths named in code spans, fenced blocks (``path`` or ``path::name``)."""
    chunks = _FENCE.findall(text) + _SPAN.findall(_FENCE.sub("", text))
    return {m.group(0).rstrip(".") for chunk in chunks for m in _PATH.finditer(chunk)}


def unrooted_paths(text: str) -> set[str]:
    """Source files named in code spans by a path a reader cannot find from the repository root."""
    spans = _SPAN.findall(_FENCE.sub("", text))
    return {m.group(0) for s in spans for m in _RELATIVE_SOURCE.finditer(s)
            if not m.group(0).startswith(tuple(r + "/" for r in ROOTS))}


def link_targets(text: str) -> set[str]:
    """Relative targets of markdown links (web addresses and in-page anchors left out)."""
    out = set()
    for target in _LINK.findall(_FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.add(target.split("#")[0])
    return out


def defined(path: Path, dotted: str) -> bool:
    """Whether ``dotted`` (``name`` or ``Class.method``) is defined at that level of a Python file."""
    body = ast.parse(path.read_text(), str(path)).body
    for part in dotted.split("."):
        nxt = None
        for node in body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            if part in names:
                nxt = node
        if nxt is None:
            return False
        body = getattr(nxt, "body", [])
    return True


def missing_path(name: str) -> str | None:
    """Why a named repository path does not hold, or None when it does."""
    path, _, symbol = name.partition("::")
    if "*" in path:
        return None if list(ROOT.glob(path)) else "matches no file"
    target = ROOT / path
    if not target.exists():
        return "does not exist"
    if symbol and not (target.suffix == ".py" and defined(target, symbol)):
        return f"defines no {symbol}"
    return None


def design_titles(design_text: str) -> dict[str, set[str]]:
    """Section number -> the normalised headings and bold paragraph titles in it ("" -> all of them)."""
    titles: dict[str, set[str]] = {"": set()}
    section = ""
    for line in design_text.splitlines():
        m = re.match(r"## (\d+)\. (.+)", line)
        if m:
            section = m.group(1)
            titles[section] = set()
            found = [m.group(2)]
        else:
            found = re.findall(r"^#{2,6} (.+)", line) + re.findall(r"^(?:- )?\*\*([^*]+)\*\*", line)
        for t in found:
            t = _norm(t)
            titles[section].add(t)
            titles[""].add(t)
    return titles


def _norm(title: str) -> str:
    return " ".join(title.strip().rstrip(".:").lower().split())


def citation_problems(text: str, titles: dict[str, set[str]]) -> list[str]:
    """Each design-doc citation in ``text`` that does not resolve, with why."""
    bad = []
    for m in _CITE.finditer(text):
        sec, name = m.group("sec"), m.group("quoted") or m.group("bare")
        if sec is not None and sec not in titles:
            bad.append(f"{m.group(0)!r}: docs/design.md has no section {sec}")
            continue
        if name:
            want, pool = _norm(name), titles[sec or ""]
            if not any(t == want or t.startswith(want + " ") for t in pool):
                where = f"section {sec}" if sec else "docs/design.md"
                bad.append(f"{m.group(0)!r}: {where} has no heading or paragraph titled {name!r}")
    for m in _UPPER_MD.finditer(text):
        if not (ROOT / m.group(1)).is_file():
            bad.append(f"{m.group(1)}: not in the repository (cite docs/design.md or say it in place)")
    return bad


def test_every_path_the_docs_name_exists():
    bad = []
    for doc in doc_files():
        text = doc.read_text()
        for name in sorted(named_paths(text)):
            why = missing_path(name)
            if why:
                bad.append(f"{doc.relative_to(ROOT)}: `{name}` {why}")
        for name in sorted(unrooted_paths(text)):
            bad.append(f"{doc.relative_to(ROOT)}: `{name}` is not named from the repository root")
        for target in sorted(link_targets(text)):
            if not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(ROOT)}: link ({target}) does not exist")
    assert not bad, "paths the docs name that do not hold:\n" + "\n".join(bad)


def test_every_design_citation_resolves():
    titles = design_titles(DESIGN.read_text())
    assert {"1", "2", "3", "4"} <= set(titles)
    bad = [f"{f.relative_to(ROOT)}: {why}" for f in source_files() if f != Path(__file__).resolve()
           for why in citation_problems(f.read_text(), titles)]
    assert not bad, "design citations that do not resolve:\n" + "\n".join(bad)


DESIGN_SAMPLE = """## 1. Semantics
### Replay mask
**Settings** (the fields).
## 3. Architecture
**Engines.** The torch engine.
"""


@pytest.mark.parametrize("text, problem", [
    ("see docs/design.md section 1, \"Replay mask\".", None),
    ("(docs/design.md section 3, engines)", None),
    ("(docs/design.md, settings)", None),
    ("(docs/design.md section 2)", "no section 2"),
    ("(docs/design.md section 1, \"Positions\")", "no heading or paragraph titled 'Positions'"),
    ("(docs/design.md section 3,\n   Replay mask)", "no heading or paragraph titled 'Replay mask'"),
    ("(docs/design.md \"Extras\")", "no heading or paragraph titled 'Extras'"),
    ("(docs/design.md section 1; the rest)", None),
    ("The layers of docs/design.md section 3, lowest first: a module", None),
    ("the paper's settings (NOTES.md)", "NOTES.md: not in the repository"),
])
def test_citation_checker_catches_what_it_should(text, problem):
    found = citation_problems(text, design_titles(DESIGN_SAMPLE))
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0], found


def test_path_checker_reads_spans_blocks_links_and_symbols():
    text = ("Run `rlmem train configs/countdown-toy.yaml` and see `outputs/run/metrics.jsonl`,\n"
            "`rlmem/eviction/policy.py::EvictionConfig`, [the design](design.md#1).\n"
            "```\nbash scripts/setup.sh && .venv/bin/python -m pytest tests/test_docs.py\n```\n")
    assert named_paths(text) == {"configs/countdown-toy.yaml", "rlmem/eviction/policy.py::EvictionConfig",
                                 "scripts/setup.sh", "tests/test_docs.py"}
    assert link_targets(text) == {"design.md"}
    assert unrooted_paths("`engine/base.py`, `rlmem/engine/base.py`, `outputs/run/x.jsonl`") == {"engine/base.py"}
    assert missing_path("rlmem/eviction/policy.py::EvictionConfig") is None
    assert missing_path("rlmem/eviction/policy.py::EvictionConfig.validate_nothing") == \
        "defines no EvictionConfig.validate_nothing"
    assert missing_path("configs/*.yaml") is None
    assert missing_path("configs/no-such.yaml") == "does not exist"

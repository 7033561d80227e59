"""The on-disk state of one ``rlmem eval`` run, built to survive crashes and Ctrl-C.

Layout of ``<out>``::

    eval_config.json            settings that change results (a resume must use the same ones)
    cells.jsonl                 the finished-cell index: one line per finished (method, ε, problem)
    records/<run>.jsonl         every rollout record of a run (``full`` or ``<method>_eps<ε>``)

A cell is committed in two appends: its records first, then its index line. Each append is one
``write`` on an ``O_APPEND`` descriptor followed by ``fsync``. A crash can therefore leave only
records of unfinished cells or a torn last line; :meth:`EvalStore.open` drops both, so every
cell in the index has exactly its records and nothing else is kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from rlmem.dirlock import DirLock, describe_holder

CONFIG_FILE = "eval_config.json"
INDEX_FILE = "cells.jsonl"
RECORDS_DIR = "records"


class StoreError(ValueError):
    """An output directory that cannot be resumed (the message says why and what to do)."""


def run_name(method: str, eps: float) -> str:
    """``full`` for the full cache, else ``<method>_eps<ε>`` (e.g. ``snapkv_eps0.5``)."""
    return "full" if method == "full" else f"{method}_eps{eps:g}"


@dataclass
class Cell:
    """One finished (method, ε, problem): per-sample outcomes, in sample order."""

    method: str
    eps: float
    problem: int
    prompt_len: int
    scores: list[float]
    completion_lens: list[int]
    peaks: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> str:
        return run_name(self.method, self.eps)


def append_lines(path: Path, lines: Iterable[str]) -> None:
    """Append whole lines with one write + fsync (a crash leaves at most one torn last line)."""
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: Path, torn: str = "tail") -> list[dict]:
    """JSON objects of ``path``, skipping a torn (unparseable) final line (a crash mid-append);
    ``torn="skip"`` skips unparseable lines anywhere (records: a lost record redoes its run)."""
    from rlmem.jsonl import iter_json_lines

    if not path.is_file():
        return []
    try:
        return [obj for _, obj in iter_json_lines(path, StoreError, torn=torn)]
    except StoreError as e:
        raise StoreError(f"{e} (the file was edited?); use a new --out") from None


def check_out_dir(out: str | os.PathLike) -> None:
    """``--out`` must be a directory or not exist yet, with an existing parent folder chain that
    is not a file (checked before anything is created)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise StoreError(f"--out {out}: exists and is not a directory")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"--out {out}: {parent} is a file, not a directory")
            break


def describe_difference(key: str, old: Any, new: Any) -> str:
    """``key: A there, B now``, descending into dicts to the first sub-key that differs
    (``model_files.model.safetensors.sha256: ...``), so a refusal names what changed."""
    if isinstance(old, dict) and isinstance(new, dict):
        sub = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if sub:
            k = sub[0]
            if k not in old:
                return f"{key}.{k}: absent there, present now"
            if k not in new:
                return f"{key}.{k}: present there, absent now"
            return describe_difference(f"{key}.{k}", old[k], new[k])
    if key.endswith("sha256") and isinstance(old, str) and isinstance(new, str):
        return f"{key}: {old[:12]}… there, {new[:12]}… now"   # a digest's head tells them apart
    return f"{key}: {old!r} there, {new!r} now"


class CellStore:
    """Finished cells in memory: what an evaluation needs to skip done work and summarise runs.

    In-training evaluation uses it as is; :class:`EvalStore` (``rlmem eval``) also persists them.
    """

    def __init__(self) -> None:
        self.cells: dict[tuple[str, int], Cell] = {}

    def done(self, run: str, problem: int) -> bool:
        return (run, problem) in self.cells

    def commit(self, cells: list[Cell], records_by_run: dict[str, list[dict]]) -> None:
        """Make ``cells`` finished (the records are kept only by stores that persist them)."""
        for c in cells:
            self.cells[(c.run, c.problem)] = c

    def run_cells(self, run: str) -> list[Cell]:
        """Finished cells of ``run``, by problem index."""
        return sorted((c for (r, _), c in self.cells.items() if r == run), key=lambda c: c.problem)


class EvalStore(CellStore):
    """The cells of an ``rlmem eval`` directory, persisted (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike):
        super().__init__()
        self.root = Path(out_dir)
        self.lock = DirLock(self.root, error=StoreError, what="eval", other="choose another --out")
        self.records_dir = self.root / RECORDS_DIR
        self.index_path = self.root / INDEX_FILE
        self.notes: list[str] = []   # what :meth:`open` repaired, for the command to print

    def open(self, settings: dict[str, Any], defaults: dict[str, Any] | None = None, *,
             normalize: dict[str, Callable[[Any], Any]] | None = None) -> int:
        """Lock, then create or resume the run directory; returns how many finished cells were found.

        ``settings`` must equal those of the run being resumed (they determine the samples). A
        setting the directory's file lacks (it predates that setting) counts as its value in
        ``defaults``: an older directory resumes when the new setting is left at its default.
        ``normalize`` maps a setting to a function applied to the directory's value before the
        comparison (``model``: an older file's relative path, resolved). A directory without a
        finished cell (its run failed before the first one) takes the new settings, noted.
        A finished cell whose records are missing (a records file deleted or cut) makes its whole
        run be redone, noted in :attr:`notes`: its records are the run's output, and a whole
        run regenerates exactly (chunk seeds), where a part of a chunk would not.
        The directory stays locked (:class:`rlmem.dirlock.DirLock`, naming the holder) until
        :meth:`close` or the process ends: two evals never append to the same files.
        """
        check_out_dir(self.root)
        try:
            self.lock.acquire()
            if self.lock.took_over:
                self.notes.append(f"took over a stale lock ({describe_holder(self.lock.took_over)}: not running)")
            self.records_dir.mkdir(exist_ok=True)
            lost = self._read_index()
            cfg_path = self.root / CONFIG_FILE
            write = not cfg_path.is_file()
            if not write:
                try:
                    old = json.loads(cfg_path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise StoreError(f"{cfg_path}: not valid JSON; use a new --out") from None
                if not isinstance(old, dict):
                    raise StoreError(f"{cfg_path}: not a JSON object; use a new --out")
                old = {**{k: v for k, v in (defaults or {}).items() if k not in old}, **old}
                for k, f in (normalize or {}).items():
                    if isinstance(old.get(k), str):
                        old[k] = f(old[k])
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                if diff:
                    what = describe_difference(diff[0], old.get(diff[0]), settings.get(diff[0]))
                    if self.cells:
                        raise StoreError(f"{self.root} holds an eval with different settings ({what}); "
                                         f"use a new --out or the same settings to resume")
                    # nothing finished under the old settings (a run that failed before its first
                    # cell): nothing can be mixed, so the corrected command takes the directory
                    self.notes.append(f"{cfg_path}: no finished cells; its settings are replaced ({what})")
                    write = True
            if write:
                tmp = cfg_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
                os.replace(tmp, cfg_path)
            self._drop_runs_missing_records()
            if lost:
                self._drop_runs_with_unindexed_records(lost)
            self._rewrite_clean_index()
            self._drop_orphan_records()
        except OSError as e:   # a read-only or foreign directory: one line, not a traceback
            self.close()
            raise StoreError(f"--out {self.root}: cannot write {e.filename or self.root} ({e.strerror})") from None
        except BaseException:
            self.close()
            raise
        return len(self.cells)

    def close(self) -> None:
        """Release the directory's lock (the process ending releases it too)."""
        self.lock.release()

    def commit(self, cells: list[Cell], records_by_run: dict[str, list[dict]]) -> None:
        """Make ``cells`` finished: their records first, then their index lines."""
        for run, recs in records_by_run.items():
            append_lines(self.records_dir / f"{run}.jsonl", (json.dumps(r) for r in recs))
        append_lines(self.index_path, (json.dumps(asdict(c)) for c in cells))
        super().commit(cells, records_by_run)

    def records_path(self, run: str) -> Path:
        return self.records_dir / f"{run}.jsonl"

    # ------------------------------------------------------------------ internals
    def _rewrite_clean_index(self) -> None:
        """Rewrite the index without a torn tail so later appends start on a fresh line."""
        if not self.index_path.is_file():
            return
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(asdict(c)) + "\n" for c in self.cells.values()))
        os.replace(tmp, self.index_path)

    def _read_index(self) -> list[int]:
        """Load the finished cells; return the numbers of lines that are not JSON (a hand edit, a
        disk fault: their cells are unknown), a torn last line (a crash mid-append) excepted."""
        from rlmem.jsonl import iter_json_lines

        if not self.index_path.is_file():
            return []
        parsed = set()
        for where, d in iter_json_lines(self.index_path, StoreError, torn="skip"):
            parsed.add(int(where.rsplit(":", 1)[1]))
            try:
                cell = Cell(**d)
            except TypeError:
                raise StoreError(f"{where}: a line is not a cell ({sorted(d)}); use a new --out") from None
            self.cells[(cell.run, cell.problem)] = cell
        lines = self.index_path.read_bytes().split(b"\n")
        numbered = [i for i, raw in enumerate(lines, 1) if raw.strip()]
        return [i for i in numbered if i not in parsed and i != numbered[-1]]

    def _drop_runs_with_unindexed_records(self, lost: list[int]) -> None:
        """Lines of the index were lost: every run with records of a cell the index lacks is redone
        (a lost cell's run is one of them; a whole run regenerates exactly)."""
        for path in sorted(self.records_dir.glob("*.jsonl")):
            run = path.stem
            problems = {rec.get("problem_index") for rec in _read_lines(path, "skip")}
            if any((run, p) not in self.cells for p in problems):
                cells = self.run_cells(run)
                for c in cells:
                    del self.cells[(run, c.problem)]
                self.notes.append(f"{self.index_path}: line {', '.join(map(str, lost))} is not a cell: "
                                  f"run {run} is redone ({len(cells)} cell{'s' * (len(cells) != 1)})")

    def _drop_runs_missing_records(self) -> None:
        """Forget every cell of a run whose records file lacks a sample of one of its cells."""
        runs = sorted({r for r, _ in self.cells})
        for run in runs:
            path = self.records_path(run)
            have = {(rec.get("problem_index"), rec.get("sample_index")) for rec in _read_lines(path, "skip")}
            cells = self.run_cells(run)
            missing = sum(1 for c in cells for j in range(len(c.scores)) if (c.problem, j) not in have)
            if missing:
                for c in cells:
                    del self.cells[(run, c.problem)]
                what = "is missing" if not path.is_file() else f"lacks {missing} records of finished cells"
                self.notes.append(f"{path} {what}: run {run} is redone ({len(cells)} cell{'s' * (len(cells) != 1)})")

    def _drop_orphan_records(self) -> None:
        """Keep only the records of finished cells (one copy each), dropping torn lines."""
        for path in sorted(self.records_dir.glob("*.jsonl")):
            run = path.stem
            kept, seen = [], set()
            for rec in _read_lines(path, "skip"):
                key = (rec.get("problem_index"), rec.get("sample_index"))
                if (run, rec.get("problem_index")) in self.cells and key not in seen:
                    seen.add(key)
                    kept.append(rec)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)

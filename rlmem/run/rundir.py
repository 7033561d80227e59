"""Who owns a run directory and what a start does with it: lock, fresh / resume / start over.

* **Lock.** A run holds ``<output_dir>/.rlmem.lock`` (host, pid, start time) with an exclusive
  ``flock`` for its whole life. A second run into the same directory is refused, naming the holder.
  A lock file whose process is gone (same host: the ``flock`` is free) is stale and taken over.
* **Fresh start** (``trainer.resume: never``, or ``auto`` without a checkpoint) into a directory
  holding another run's files is refused, unless ``trainer.start_over=true``, which moves them into
  ``<output_dir>/previous/<UTC time>/`` (nothing is ever deleted).
* **Resume** takes the newest checkpoint that verifies (``auto``, saying why newer ones were
  skipped) or the one named (a damaged one fails in one line naming the file). The config must mean
  the same as the checkpoint's own ``config.yaml`` (:func:`meaning_differences`), unless
  ``trainer.allow_config_change=true``. Checkpoints newer than the one resumed from belong to an
  abandoned continuation: they are moved aside, so they can never be resumed by mistake later.
  Every log is trimmed to the checkpoint's step (:func:`trim_logs`).

:func:`plan_start` only reads, so ``rlmem config show`` can report what ``train`` would do;
:func:`apply_plan` does the moves and trims once the lock is held.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlmem.dirlock import LOCK_FILE, DirLock, describe_holder  # noqa: F401 (re-exported)
from rlmem.jsonl import iter_json_lines
from rlmem.run import checkpoint as ckpt
from rlmem.run.config import RunConfig
from rlmem.run.errors import TrainingError
from rlmem.run.logger import RECORDS_DIR

PREVIOUS_DIR = "previous"
CONFIG_FILE = "config.yaml"
LOG_FILES = ("metrics.jsonl", "samples.jsonl", "eval.jsonl", "timeline.jsonl")
# Entries that do not make a directory "another run's": ours, or made by any start.
_OWN_ENTRIES = {LOCK_FILE, PREVIOUS_DIR}

# Config keys that do not change what a run computes: where and how it runs, how it logs, how long.
# In-training evaluation (``eval``, ``trainer.eval_every``) samples with its own seeds and leaves the
# training RNG and weights alone (tests/test_train_e2e.py: a resume with evals = a run without).
OPERATIONAL_KEYS = (
    "output_dir", "trainer.total_steps", "trainer.resume", "trainer.start_over", "trainer.allow_config_change",
    "trainer.log_every", "trainer.save_every", "trainer.keep_last", "trainer.eval_every", "logging", "ray", "eval",
    "learner.num_workers", "learner.micro_batch_size", "learner.gradient_checkpointing",
    "learner.offload_optimizer", "rollout.vllm",
)


class RunDirLock(DirLock):
    """An exclusive, process-lifetime lock on a run directory (:class:`rlmem.dirlock.DirLock`)."""

    def __init__(self, output_dir: Path):
        super().__init__(output_dir, error=lambda msg: TrainingError(msg, exit_code=2), what="run",
                         other="choose another output_dir")


# ----------------------------------------------------------------------------------------------
# Deciding how a run starts


@dataclass
class StartPlan:
    """What a start will do. ``resume_from`` None means a fresh start from step 0."""

    resume_from: Path | None = None
    step: int = 0                                   # steps already done (the checkpoint's)
    move_aside: list[Path] = field(default_factory=list)   # old entries to move into previous/
    notes: list[str] = field(default_factory=list)  # what to tell the user (skipped checkpoints, ...)

    def describe(self) -> str:
        head = f"resume from {self.resume_from} (step {self.step})" if self.resume_from else "fresh start"
        return "; ".join([head] + self.notes)


def foreign_entries(out: Path) -> list[Path]:
    """Entries of ``out`` besides the lock and ``previous/``: another run's files."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name not in _OWN_ENTRIES)


def plan_start(cfg: RunConfig) -> StartPlan:
    """Decide fresh / resume / start over from ``trainer.*`` and the directory (reads only).

    Raises :class:`TrainingError` (exit code 2) with one line saying what to do when refused."""
    out, t = cfg.output_path, cfg.trainer
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} exists and is not a directory", exit_code=2)
    existing = foreign_entries(out)
    if t.resume not in ("auto", "never"):
        where = Path(t.resume).expanduser()
        try:
            ckpt.verify_checkpoint(where)
        except ckpt.CheckpointError as e:
            raise TrainingError(f"trainer.resume: checkpoint {where} is damaged: {e}", exit_code=2) from None
        return _resume_plan(cfg, where, [])
    if t.resume == "auto" and not t.start_over:
        found, skipped = ckpt.latest_verified(out)
        notes = [f"skipped newer {p.name}: {why}" for p, why in skipped]
        if found is not None:
            return _resume_plan(cfg, found, notes)
        if skipped:
            raise TrainingError(f"{out}: no checkpoint verifies ({'; '.join(notes)}); set trainer.start_over=true "
                                f"to move this run aside and start again", exit_code=2)
        if existing and _same_run_without_checkpoint(cfg):
            return StartPlan(notes=["no checkpoint yet: this run starts again from step 1"])
    if existing and not t.start_over:
        names = ", ".join(p.name for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise TrainingError(f"output_dir {out} already holds another run's files ({names}) and no checkpoint to "
                            f"resume; set trainer.start_over=true to move them into {out / PREVIOUS_DIR}/ and start "
                            f"fresh, or choose another output_dir", exit_code=2)
    plan = StartPlan(move_aside=existing)
    if existing:
        plan.notes.append(f"moving {len(existing)} earlier entries into {out / PREVIOUS_DIR}/")
    return plan


def _same_run_without_checkpoint(cfg: RunConfig) -> bool:
    """The directory holds this very run (same meaning), stopped before its first checkpoint."""
    saved = cfg.output_path / CONFIG_FILE
    if ckpt.list_checkpoints(cfg.output_path) or not saved.is_file():
        return False
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return False
    return isinstance(old, dict) and not meaning_differences(old, cfg.model_dump(mode="json"))


def _resume_plan(cfg: RunConfig, where: Path, notes: list[str]) -> StartPlan:
    state = ckpt.load_trainer_state(where)
    saved = where / CONFIG_FILE
    if saved.is_file():
        diffs = meaning_differences(yaml.safe_load(saved.read_text()) or {}, cfg.model_dump(mode="json"))
        if diffs and not cfg.trainer.allow_config_change:
            raise TrainingError(f"the config differs from the one {where.name} was trained with: {'; '.join(diffs)}; "
                                f"undo the change, or set trainer.allow_config_change=true to resume anyway",
                                exit_code=2)
        if diffs:
            notes.append(f"config changed on purpose: {'; '.join(diffs)}")
    newer = [p for s, p in ckpt.list_checkpoints(cfg.output_path) if s > state.step]
    if newer:
        notes.append(f"moving newer checkpoints {', '.join(p.name for p in newer)} into "
                     f"{cfg.output_path / PREVIOUS_DIR}/")
    return StartPlan(resume_from=where, step=state.step, move_aside=newer, notes=notes)


_ABSENT = object()


def _default_of(key: str) -> Any:
    """The schema default of dotted ``key`` (``_ABSENT`` when it has none, e.g. a required field)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    model: Any = RunConfig
    *parents, leaf = key.split(".")
    for part in parents:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None or field.default_factory is not None:
            return _ABSENT
        model = field.annotation
    field = model.model_fields.get(leaf) if isinstance(model, type) and issubclass(model, BaseModel) else None
    if field is None or field.default is PydanticUndefined:
        return _ABSENT
    return field.default


def meaning_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs, ignoring :data:`OPERATIONAL_KEYS`.

    A key the old config lacks (a setting added to rlmem since that run was saved) is no change
    when the new config holds its default: upgrading rlmem must not block resuming a run."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if any(key == k or key.startswith(k + ".") for k in OPERATIONAL_KEYS):
            return
        if a is _ABSENT:
            d = _default_of(key)
            if d is not _ABSENT and (b == d or (hasattr(d, "model_dump") and b == d.model_dump(mode="json"))):
                return
            a = None
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, _ABSENT), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{key}: {a!r} -> {b!r}")

    walk(old, new, "")
    return out


def apply_plan(cfg: RunConfig, plan: StartPlan) -> None:
    """Move old entries aside, trim the logs to the start step, record the resolved config."""
    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    if plan.move_aside:
        dest = out / PREVIOUS_DIR / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        for p in plan.move_aside:
            target = dest / p.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(target))
    trim_logs(out, plan.step)
    (out / CONFIG_FILE).write_text(cfg.to_yaml())


def trim_logs(out: Path, last_step: int) -> None:
    """Keep only rows with ``step <= last_step`` in every JSON-lines log (atomically); torn lines go.
    Rollout-record files of later steps (``records/step_NNNNNN.jsonl``) are removed."""
    for path in sorted((out / RECORDS_DIR).glob("step_*.jsonl*")):
        digits = path.name[len("step_"):].split(".")[0]
        if path.suffix == ".tmp" or (digits.isdigit() and int(digits) > last_step):
            path.unlink()
    for name in LOG_FILES:
        path = out / name
        if not path.exists():
            continue
        kept = []
        # torn="skip": a line torn by a crash mid-append goes (rows are re-written as the logger wrote them)
        for _, row in iter_json_lines(path, objects=False, torn="skip"):
            try:
                if int(row.get("step", 1 << 62)) <= last_step:
                    kept.append(json.dumps(row))
            except (ValueError, AttributeError, TypeError):
                continue   # not a row with a step
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        os.replace(tmp, path)

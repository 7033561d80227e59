"""Checkpoint layout, the trainer state, rotation and RNG capture, for exact resume.

Layout::

    <output_dir>/checkpoints/step_000050/
        engine/              the learner's DeepSpeed state (weights, optimizer, scheduler), any ranks
        hf/                  HF-format export (config, safetensors, tokenizer): from_pretrained / vLLM
        trainer_state.json   written LAST, atomically: its presence marks the checkpoint complete

A crash while saving leaves a directory without ``trainer_state.json``; :func:`latest_checkpoint`
ignores it, so resume never picks up half a checkpoint. The engine parts are written by a callback
(the learner's ``save_checkpoint``), this module only arranges directories and the trainer state.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "trainer_state.json"
ENGINE_SUBDIR = "engine"
HF_SUBDIR = "hf"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class CheckpointPaths:
    """Where the parts of one checkpoint go; handed to the save callback."""

    root: Path

    @property
    def engine(self) -> Path:
        return self.root / ENGINE_SUBDIR

    @property
    def hf(self) -> Path:
        return self.root / HF_SUBDIR

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE


@dataclass
class TrainerState:
    """Everything besides the engine needed to continue a run exactly where it stopped.

    ``step`` is the number of completed training steps (resume starts at step ``step``);
    ``data_position`` is whatever the data loader needs to continue (an int or a JSON mapping).
    """

    step: int
    data_position: Any = 0
    curriculum_step: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    saved_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "step" not in known:
            raise ValueError("trainer state has no 'step'")
        return cls(**known)


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step_{int(step):06d}"


def is_complete(ckpt: str | os.PathLike) -> bool:
    """A checkpoint is complete iff its trainer state exists and parses."""
    try:
        load_trainer_state(ckpt)
    except (OSError, ValueError, TypeError):
        return False
    return True


def list_checkpoints(output_dir: str | os.PathLike, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, dir)`` pairs, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (not complete_only or is_complete(p)):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """``trainer.resume``: ``auto`` (latest complete checkpoint, if any), ``never``, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    p = Path(resume).expanduser()
    if not is_complete(p):
        raise FileNotFoundError(f"trainer.resume: {p} is not a complete checkpoint (no readable {STATE_FILE})")
    return p


def save_checkpoint(
    output_dir: str | os.PathLike,
    state: TrainerState,
    save_parts: Callable[[CheckpointPaths], None] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``state.step``: the parts via ``save_parts``, then the state, then rotate.

    A stale incomplete directory of the same step (an earlier crash) is cleared first. If
    ``save_parts`` raises, no trainer state is written and the directory stays incomplete.
    """
    paths = CheckpointPaths(checkpoint_dir(output_dir, state.step))
    if paths.root.exists() and not is_complete(paths.root):
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    if save_parts is not None:
        save_parts(paths)
    state.saved_at = time.time()
    _atomic_write_json(paths.state, state.to_dict())
    if keep_last is not None:
        rotate_checkpoints(output_dir, keep_last)
    return paths.root


def load_trainer_state(ckpt: str | os.PathLike) -> TrainerState:
    path = Path(ckpt) / STATE_FILE
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return TrainerState.from_dict(d)


def rotate_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete leftovers older
    than the newest complete one (a newer incomplete directory may be a save in progress)."""
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    complete = list_checkpoints(output_dir)
    removed: list[Path] = []
    if not complete:
        return removed
    newest = complete[-1][0]
    doomed = [p for _, p in complete[:-keep_last]]
    doomed += [p for s, p in list_checkpoints(output_dir, complete_only=False) if s < newest and not is_complete(p)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# RNG states (JSON-serialisable so that they live in trainer_state.json)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, and every CUDA device if any) generator states."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    import numpy as np
    import torch

    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])


def _b64(t) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()

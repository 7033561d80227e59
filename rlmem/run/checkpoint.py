"""Checkpoint layout, verification, the trainer state, rotation and RNG capture, for exact resume.

Layout::

    <output_dir>/checkpoints/step_000050/     after step 50 (steps count from 1)
        engine/              the learner's DeepSpeed state (weights, optimizer, scheduler), any ranks
        hf/                  HF-format export (config, safetensors, tokenizer): from_pretrained / vLLM
        trainer_state.json   step, RNG states, W&B run id
        config.yaml          the resolved run config this checkpoint was trained with
        inflight/            trainer.max_staleness >= 1: the rollouts of steps 51..50+k, already sampled
                             by older weights (step_000051.jsonl ..., and inflight.json: who sampled them)
        manifest.json        written LAST: every file with its size, SHA-256 of the small ones

A checkpoint is written into ``checkpoints/.tmp-step_000050-<pid>/`` and renamed into place only
once its manifest is written, so a ``step_*`` directory is never half-written by a save. A
checkpoint *verifies* when its manifest parses and every listed file exists with its size (and,
for files up to :data:`CHECKSUM_MAX_BYTES`, its checksum): a truncated weight file, a deleted
``engine/`` or a damaged ``trainer_state.json`` are all caught, and :func:`verify_checkpoint`
names the bad file. The engine parts are written by a callback (the learner's ``save_checkpoint``).
"""

from __future__ import annotations

import base64
import hashlib
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
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
CHECKSUM_MAX_BYTES = 1 << 20
ENGINE_SUBDIR = "engine"
HF_SUBDIR = "hf"
INFLIGHT_SUBDIR = "inflight"
INFLIGHT_INDEX = "inflight.json"
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

    @property
    def inflight(self) -> Path:
        return self.root / INFLIGHT_SUBDIR


@dataclass
class TrainerState:
    """Everything besides the engine needed to continue a run exactly where it stopped.

    ``step`` is the number of completed training steps (the last one done; resume runs
    ``step + 1`` next). The prompt stream and curriculum are pure functions of it, so nothing else
    about the data is stored.
    """

    step: int
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


class CheckpointError(ValueError):
    """A checkpoint that does not verify; the message names the bad file."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path) -> dict[str, Any]:
    """List every file under ``root`` with its size (and SHA-256 if small); written last, atomically."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(f".{MANIFEST_FILE}"):
            rel = p.relative_to(root).as_posix()
            size = p.stat().st_size
            files[rel] = {"size": size, **({"sha256": file_digest(p)} if size <= CHECKSUM_MAX_BYTES else {})}
    manifest = {"version": FORMAT_VERSION, "files": files}
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return manifest


def verify_checkpoint(ckpt: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first missing, truncated or altered file."""
    root = Path(ckpt)
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or STATE_FILE not in files:
            raise ValueError("no trainer state listed")
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: missing (the checkpoint was never completed)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    if not any(name.startswith(ENGINE_SUBDIR + "/") for name in files):
        raise CheckpointError(f"{root / ENGINE_SUBDIR}: the manifest lists no engine files")
    for name, meta in files.items():
        p = root / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        size = p.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"{p}: {size} bytes, the manifest says {meta.get('size')} (truncated or altered)")
        if "sha256" in meta and file_digest(p) != meta["sha256"]:
            raise CheckpointError(f"{p}: checksum differs from the manifest (altered)")
    try:
        load_trainer_state(root)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{root / STATE_FILE}: unreadable ({e})") from None


def checkpoint_problem(ckpt: str | os.PathLike) -> str | None:
    """Why ``ckpt`` does not verify, or None."""
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as e:
        return str(e)
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory as ``(step, dir)``, oldest first, verified or not."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_verified(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones skipped with the reason for each."""
    skipped: list[tuple[Path, str]] = []
    for _, p in reversed(list_checkpoints(output_dir)):
        why = checkpoint_problem(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def save_checkpoint(
    output_dir: str | os.PathLike,
    state: TrainerState,
    save_parts: Callable[[CheckpointPaths], None] | None = None,
    keep_last: int | None = None,
    config_yaml: str | None = None,
) -> Path:
    """Write checkpoint ``state.step`` into a temporary directory: the parts via ``save_parts``, the
    state, the config, then the manifest; rename it into place; rotate.

    If ``save_parts`` raises, the temporary directory is left for the next rotation to remove and no
    ``step_*`` directory appears. An existing directory of the same step (from a run that was
    resumed from an earlier checkpoint) is replaced only after the new one is complete.
    """
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    paths = CheckpointPaths(tmp)
    if save_parts is not None:
        save_parts(paths)
    state.saved_at = time.time()
    atomic_write_json(paths.state, state.to_dict())
    if config_yaml is not None:
        (tmp / CONFIG_FILE).write_text(config_yaml)
    write_manifest(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep_last is not None:
        rotate_checkpoints(output_dir, keep_last)
    return final


def load_trainer_state(ckpt: str | os.PathLike) -> TrainerState:
    path = Path(ckpt) / STATE_FILE
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return TrainerState.from_dict(d)


def rotate_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` verified checkpoints, unverified ones older than the
    newest verified one, and temporary directories of saves that died (their process is gone)."""
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    ckpts = list_checkpoints(output_dir)
    ok = [(s, p) for s, p in ckpts if checkpoint_problem(p) is None]
    removed: list[Path] = []
    doomed = [p for _, p in ok[:-keep_last]]
    if ok:
        doomed += [p for s, p in ckpts if s < ok[-1][0] and (s, p) not in ok]
    root = checkpoints_root(output_dir)
    for p in root.glob(".tmp-step_*") if root.is_dir() else []:
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            doomed.append(p)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
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


# ----------------------------------------------------------------------------------------------
# In-flight rollouts (trainer.max_staleness >= 1; docs/design.md section 5)


def save_inflight(paths: CheckpointPaths, rollouts: dict[int, tuple[list, dict[str, Any]]]) -> None:
    """Write the rollouts already generated for later steps: ``inflight/step_NNNNNN.jsonl`` per step
    (the records, JSON floats round-trip exactly) and ``inflight/inflight.json`` (per step what the
    driver knows besides the records: ``sampled_by_step``, token count, seconds). Called by the save
    callback, so the manifest, written after, lists them: a save cut short here never verifies."""
    from rlmem.eviction.record import write_jsonl

    if not rollouts:
        return
    paths.inflight.mkdir(parents=True, exist_ok=True)
    for step, (records, _) in rollouts.items():
        write_jsonl(paths.inflight / f"step_{int(step):06d}.jsonl", records)
    atomic_write_json(paths.inflight / INFLIGHT_INDEX, {str(int(s)): meta for s, (_, meta) in rollouts.items()})


def load_inflight(ckpt: str | os.PathLike) -> dict[int, tuple[list, dict[str, Any]]]:
    """What :func:`save_inflight` wrote into checkpoint ``ckpt``: ``{step: (records, meta)}``; empty
    when it holds none (a run with ``max_staleness: 0``, or saved at the last step)."""
    from rlmem.eviction.record import read_jsonl

    root = Path(ckpt) / INFLIGHT_SUBDIR
    index = root / INFLIGHT_INDEX
    if not index.is_file():
        return {}
    with open(index) as f:
        metas = json.load(f)
    return {int(s): (read_jsonl(root / f"step_{int(s):06d}.jsonl"), meta) for s, meta in metas.items()}

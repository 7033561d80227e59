"""Housekeeping for DeepSpeed's CPU shared-memory collectives, which outlive the learners that make them.

On CPU, ``deepspeed.init_distributed`` JIT-builds a small C++ op (``deepspeed_shm_comm``) and each
learner maps a 66 MB allreduce buffer, ``/dev/shm/deepspeed_allreduce_buffer_*``. Nothing removes
that file: Ray ends its workers without running their exit hooks, so every training run (and every
test that builds a learner) leaves one behind in RAM-backed ``/dev/shm``. After a few hundred runs
the machine is out of memory and Ray's OOM killer takes the next run's workers (measured on the
development machine: 247 files, 16 GB). A learner killed while it builds the op leaves the build's
``lock`` file, and every later learner then waits on it forever, silently.

So a learner that is stopped by the driver unlinks the buffers it maps (:func:`release_own_buffers`),
and before a CPU learner joins the process group it removes buffers no live process has mapped (a
run that was killed never stopped its learners), and a build lock older than any build. All of it
is best effort: a failure here is reported, never raised.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("rlmem.learner.deepspeed_shm")

SHM_DIR = Path("/dev/shm")
BUFFER_PREFIX = "deepspeed_"
SHM_OP_NAME = "deepspeed_shm_comm"


def paths_in_maps(maps_text: str) -> set[str]:
    """The file paths of a ``/proc/<pid>/maps`` text (an unlinked file's ``" (deleted)"`` dropped)."""
    paths = set()
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            paths.add(parts[5].removesuffix(" (deleted)"))
    return paths


def mapped_paths(proc: Path = Path("/proc")) -> set[str]:
    """Every file some live process has mapped or open (Linux ``/proc``; empty elsewhere)."""
    paths: set[str] = set()
    if not proc.is_dir():
        return paths
    for pid in (p for p in proc.iterdir() if p.name.isdigit()):
        try:
            paths |= paths_in_maps((pid / "maps").read_text())
            for fd in (pid / "fd").iterdir():
                paths.add(os.readlink(fd))
        except OSError:   # the process ended, or is not ours to read
            continue
    return paths


def sweep_stale_buffers(shm_dir: Path = SHM_DIR, min_age_s: float = 60.0) -> list[Path]:
    """Remove DeepSpeed shared-memory buffers that no live process maps and that are older than
    ``min_age_s`` (a buffer is created, then mapped: the age keeps a starting run's buffer safe).
    Returns what was removed."""
    if not shm_dir.is_dir():
        return []
    candidates = [p for p in shm_dir.glob(BUFFER_PREFIX + "*") if p.is_file()]
    if not candidates:
        return []
    in_use, now, removed = mapped_paths(), time.time(), []
    for p in candidates:
        try:
            if str(p) in in_use or now - p.stat().st_mtime < min_age_s:
                continue
            p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed


def release_own_buffers(shm_dir: Path = SHM_DIR, maps: Path = Path("/proc/self/maps")) -> list[Path]:
    """Unlink the DeepSpeed buffers this process maps, as it ends (the mappings stay valid until the
    process exits; the memory goes with it). Only an ending learner calls this: its peers end too."""
    try:
        mine = paths_in_maps(maps.read_text())
    except OSError:
        return []
    prefix, removed = str(shm_dir / BUFFER_PREFIX), []
    for path in sorted(mine):
        if path.startswith(prefix):
            try:
                Path(path).unlink()
                removed.append(Path(path))
            except OSError:
                continue
    return removed


def clear_stale_build_lock(build_dir: Path, max_age_s: float = 600.0) -> Path | None:
    """Remove ``build_dir/lock`` when it is older than ``max_age_s`` (the op builds in well under a
    minute: an older lock belongs to a builder that was killed). Returns the removed lock."""
    lock = build_dir / "lock"
    try:
        if lock.is_file() and time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            return lock
    except OSError:
        pass
    return None


def shm_op_build_dir() -> Path | None:
    """Where torch JIT-builds DeepSpeed's shm op (``TORCH_EXTENSIONS_DIR`` or torch's default)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(SHM_OP_NAME, verbose=False))
    except Exception:   # a private torch helper: if it moves, skip the lock check rather than fail
        return None


def private_build_dir(env: dict[str, str] | None = None) -> Path | None:
    """``<venv>/torch_extensions`` for DeepSpeed's shm op when ``TORCH_EXTENSIONS_DIR`` is unset and
    Python runs in a writable virtual environment (else None: torch's default stays). By default
    torch builds every install's op in one ``~/.cache/torch_extensions/<py>_cpu``; two installs
    (a checkout and a CI clone) then rebuild over each other and share one lock file."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR") or sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return None
    return Path(sys.prefix) / "torch_extensions"


def tidy_before_init() -> None:
    """Use a per-install build directory, run both clean-ups and say what they removed (called by
    the learner before it joins)."""
    try:
        private = private_build_dir()
        if private is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = str(private)
        removed = sweep_stale_buffers()
        if removed:
            log.warning("removed %d shared-memory buffers of ended DeepSpeed learners from %s", len(removed), SHM_DIR)
        build_dir = shm_op_build_dir()
        lock = clear_stale_build_lock(build_dir) if build_dir is not None else None
        if lock is not None:
            log.warning("removed %s, left by a learner killed while building DeepSpeed's shm op", lock)
    except Exception as e:   # housekeeping must never stop a run
        log.warning("could not tidy DeepSpeed's shared memory: %s", e)

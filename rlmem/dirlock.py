"""An exclusive, process-lifetime lock on an output directory, naming its holder.

Training's run directories (:class:`rlmem.run.rundir.RunDirLock`) and ``rlmem eval``'s output
directories (:mod:`rlmem.evaluation.store`) both use it, so two processes never append to the
same files. The lock is ``<dir>/.rlmem.lock``, held with an exclusive ``flock`` for the holder's
whole life and holding ``{"host", "pid", "started"}``:

* a second process is refused, naming the holder (host, pid, start time);
* a lock file whose process is gone (same host: the ``flock`` is free, the kernel dropped it when
  the process died, ``kill -9`` included) is stale and taken over (:attr:`DirLock.took_over`);
* a lock file written by another host is refused: ``flock`` says nothing across hosts (shared
  file systems), so only the user can tell whether that holder is gone.

It lives in the core layer (not in ``rlmem.run``) because the evaluation layer is core and must
not import the run layer (tests/test_codebase.py::LAYERS).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

LOCK_FILE = ".rlmem.lock"


class DirLockError(RuntimeError):
    """The directory is held by another process (the message names it)."""


class DirLock:
    """Lock ``directory`` (created if missing) for this process; ``error(message)`` builds the
    exception a refusal raises, ``what`` names the holder's kind in it ("run", "eval") and
    ``other`` says what else the user can do ("choose another output_dir")."""

    def __init__(self, directory: str | os.PathLike, *, error: Callable[[str], Exception] = DirLockError,
                 what: str = "process", other: str = "choose another directory"):
        self.path = Path(directory) / LOCK_FILE
        self.error, self.what, self.other = error, what, other
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None   # the stale holder we replaced, if any

    def acquire(self) -> "DirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise self.error(f"{self.path.parent} is in use by another {self.what} ({describe_holder(holder)}); "
                             f"wait for it, stop it, or {self.other}") from None
        holder = read_holder(fd)
        if holder and holder.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise self.error(f"{self.path.parent} is locked by a {self.what} on another host "
                             f"({describe_holder(holder)}); if that {self.what} is gone, delete {self.path}")
        self.took_over = holder or None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)   # closing drops the flock
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(fd: int) -> dict[str, Any]:
    """The holder recorded in an open lock file (``{}`` if empty or unreadable)."""
    try:
        raw = os.pread(fd, 4096, 0)
        d = json.loads(raw.decode() or "{}")
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(h: dict[str, Any]) -> str:
    """``pid 123 on host, started 2026-01-01 00:00:00 UTC``."""
    if not h:
        return "holder unknown"
    when = _dt.datetime.fromtimestamp(h.get("started", 0), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {h.get('pid')} on {h.get('host')}, started {when}"

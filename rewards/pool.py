"""A persistent pool of grader processes with a hard wall-clock kill per item.

Graders such as ``math-verify`` can hang (sympy on ``2^{2^{10^9}}``), crash, or raise
``BaseException`` subclasses; their own timeouts use ``signal.alarm`` and therefore only work in
a process's main thread. ``GraderPool`` runs each item in a separate worker process:

* every worker serves one item at a time over its own pipe;
* an item that has not answered ``timeout`` seconds after it was handed to a worker gets the
  ``default`` value, and that worker is killed (SIGKILL) and replaced in the background;
* an item whose worker dies or raises anything also gets ``default``;
* ``map`` is safe to call from any thread (non-main threads, Ray actors, several threads at
  once): workers are checked out from a thread-safe queue, and no signals are used in the caller.

Workers are fresh interpreters started with :mod:`subprocess` (``python -c``) and talk over two
dedicated pipes; there is no ``fork`` of a multi-threaded trainer and, unlike multiprocessing's
``spawn``/``forkserver``, the caller's ``__main__`` is never re-imported, so the pool works from
scripts without a ``__main__`` guard, stdin, notebooks and Ray workers alike. The function run by a worker is named by a
``"module:function"`` string, imported once per worker; it must be a top-level function.

Wall-clock bound of ``map`` over ``n`` items with ``w`` workers: about ``ceil(n / w) * timeout``
in the worst case (every item hangs), independent of how long a hang would last.
"""

from __future__ import annotations

import atexit
import importlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import Any, Iterable, Sequence

_READY = "__ready__"
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so workers import `rewards`


def _worker_main(conn, preload: Sequence[str]) -> None:  # runs in the child process
    funcs: dict[str, Any] = {}
    for mod in preload:
        try:
            importlib.import_module(mod)
        except BaseException:  # noqa: BLE001 - a broken preload must not kill the worker
            pass
    try:
        conn.send(_READY)
    except BaseException:  # noqa: BLE001
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if msg is None:
            return
        func_ref, args = msg
        try:
            fn = funcs.get(func_ref)
            if fn is None:
                module_name, _, attr = func_ref.partition(":")
                fn = getattr(importlib.import_module(module_name), attr)
                funcs[func_ref] = fn
            out = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
            out = ("err", f"{type(e).__name__}: {str(e)[:200]}")
        try:
            conn.send(out)
        except BaseException:  # noqa: BLE001 - e.g. an unpicklable result
            try:
                conn.send(("err", "unpicklable result"))
            except BaseException:  # noqa: BLE001
                return


class _Worker:
    __slots__ = ("proc", "conn", "rconn")

    def __init__(self, proc, conn, rconn):
        self.proc = proc    # subprocess.Popen
        self.conn = conn    # parent -> child (send)
        self.rconn = rconn  # child -> parent (recv; what we wait on)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
        for c in (self.conn, self.rconn):
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            self.proc.wait(timeout=2.0)
        except Exception:  # noqa: BLE001
            pass


def worker_entry() -> None:
    """Entry point of a worker process: ``python -c ... <read_fd> <write_fd> [preload...]``."""
    import logging

    logging.disable(logging.WARNING)  # math-verify logs every timeout; keep stderr for real errors
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    conn = _Duplex(Connection(rfd, writable=False), Connection(wfd, readable=False))
    _worker_main(conn, sys.argv[3:])


class _Duplex:
    def __init__(self, r, w):
        self.r, self.w = r, w

    def recv(self):
        return self.r.recv()

    def send(self, obj):
        self.w.send(obj)


class GraderPool:
    """A fixed number of persistent grader processes; see the module docstring."""

    def __init__(self, num_workers: int | None = None, *, preload: Sequence[str] = (),
                 start_timeout: float = 120.0):
        self.num_workers = max(1, int(num_workers or min(4, os.cpu_count() or 1)))
        self.preload = tuple(preload)
        self.start_timeout = float(start_timeout)
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()
        self._closed = False
        self._pid = os.getpid()
        self._start_failures = 0
        self._broken = False
        self.kills = 0  # number of workers killed for exceeding the timeout (or dying)
        for _ in range(self.num_workers):
            self._spawn()

    # -- worker lifecycle ---------------------------------------------------------------------
    def _spawn(self) -> None:
        """Start one worker; it joins the idle queue once it has imported its modules."""
        if self._closed:
            return
        c_r, p_w = os.pipe()  # parent -> child
        p_r, c_w = os.pipe()  # child -> parent
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_ROOT, env.get("PYTHONPATH", "")]))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from rewards.pool import worker_entry; worker_entry()",
                 str(c_r), str(c_w), *self.preload],
                pass_fds=(c_r, c_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env, close_fds=True, start_new_session=True,
            )
        finally:
            os.close(c_r)
            os.close(c_w)
        w = _Worker(proc, Connection(p_w, readable=False), Connection(p_r, writable=False))
        with self._lock:
            self._all.add(w)
        threading.Thread(target=self._await_ready, args=(w,), daemon=True).start()

    def _await_ready(self, w: _Worker) -> None:
        ok = False
        try:
            if w.rconn.poll(self.start_timeout):
                ok = w.rconn.recv() == _READY
        except Exception:  # noqa: BLE001
            ok = False
        if ok and not self._closed:
            self._start_failures = 0
            self._idle.put(w)
            return
        self._retire(w)
        self._start_failures += 1
        if self._start_failures >= 3 * self.num_workers:
            self._broken = True
            return
        if not self._closed:
            time.sleep(0.5)  # do not spin if workers cannot start at all
            self._spawn()

    def _retire(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            self._all.discard(w)

    def _replace(self, w: _Worker) -> None:
        self.kills += 1
        self._retire(w)
        self._spawn()

    def _checkout(self, block: bool) -> _Worker | None:
        if not block:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                return None
        while True:  # other threads may hold every worker for a while; wait for one
            if self._broken:
                raise RuntimeError(f"grader workers failed to start {self._start_failures} times in a row")
            if self._closed:
                raise RuntimeError("GraderPool is closed")
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                continue

    # -- public API ---------------------------------------------------------------------------
    def map(self, func_ref: str, args_list: Iterable[tuple], *, timeout: float,
            default: Any = None) -> list:
        """Run ``func_ref(*args)`` for each args tuple; ``default`` for items that time out/fail."""
        if self._closed:
            raise RuntimeError("GraderPool is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("GraderPool used in a forked child; create a new pool there")
        items = list(args_list)
        results: list = [default] * len(items)
        pending = deque(range(len(items)))
        in_flight: dict[Any, tuple[_Worker, int, float]] = {}  # keyed by the worker's rconn
        while pending or in_flight:
            # Check out workers: block only if we hold none (so threads sharing the pool progress).
            while pending:
                w = self._checkout(block=not in_flight)
                if w is None:
                    break
                idx = pending.popleft()
                try:
                    w.conn.send((func_ref, items[idx]))
                except Exception:  # noqa: BLE001 - dead worker or unpicklable args
                    self._replace(w)
                    continue
                in_flight[w.rconn] = (w, idx, time.monotonic() + timeout)
            if not in_flight:
                continue
            now = time.monotonic()
            next_deadline = min(d for _, _, d in in_flight.values())
            ready = mp_wait(list(in_flight), timeout=max(0.0, next_deadline - now))
            for conn in ready:
                w, idx, _ = in_flight.pop(conn)
                try:
                    status, value = conn.recv()
                except Exception:  # noqa: BLE001 - EOF: the worker died
                    self._replace(w)
                    continue
                if status == "ok":
                    results[idx] = value
                self._idle.put(w)
            now = time.monotonic()
            for conn in [c for c, (_, _, d) in in_flight.items() if d <= now]:
                w, idx, _ = in_flight.pop(conn)
                self._replace(w)  # hard kill: the item keeps `default`
        return results

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            try:
                w.conn.send(None)
            except Exception:  # noqa: BLE001
                pass
            w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SHARED: dict[tuple, GraderPool] = {}
_SHARED_LOCK = threading.Lock()


def get_pool(name: str = "default", *, num_workers: int | None = None,
             preload: Sequence[str] = ()) -> GraderPool:
    """A process-wide pool shared by all threads (created lazily, re-created after a fork)."""
    key = (name, os.getpid())
    with _SHARED_LOCK:
        pool = _SHARED.get(key)
        if pool is None or pool._closed:
            pool = GraderPool(num_workers, preload=preload)
            _SHARED[key] = pool
        return pool


@atexit.register
def _close_shared() -> None:
    for key, pool in list(_SHARED.items()):
        if key[1] == os.getpid():
            pool.close()

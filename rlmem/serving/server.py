"""The ``rlmem serve`` launcher: vLLM's OpenAI-compatible API server with rlmem's scheduler and worker hooks.

:func:`vllm_argv` builds the ``vllm serve`` arguments (rlmem's scheduler, worker extension and
middleware, prefix caching off, the server's eviction defaults in ``--additional-config``);
:func:`serve` parses them with vLLM's own parser and runs vLLM's own server functions
(``build_async_engine_client``, ``build_and_serve``), with one step between them: the worker hooks
are installed through the engine client's ``collective_rpc`` before the first request can arrive
(the offline engine does the same right after ``LLM(...)``). SIGTERM or Ctrl-C stop it the way
they stop ``vllm serve``: in-flight requests get ``--shutdown-timeout`` seconds to finish, the rest
are aborted, the engine-core process exits, and so does this one, with 0.

:func:`start` runs ``rlmem serve`` as a child process for tests and benchmarks and returns a
:class:`ServerHandle` (``url``, ``wait_ready``, ``metrics``, ``stop``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rlmem.engine.vllm.engine import WORKER_EXTENSION, check_block_size, check_eviction, cuda_present, engine_dtype
from rlmem.engine.vllm.served import ServeDefaults
from rlmem.eviction.policy import EvictionConfig
from rlmem.ports import free_port

SCHEDULER = "rlmem.serving.scheduler.ServingScheduler"
MIDDLEWARE = "rlmem.serving.middleware.EvictionArgs"


@dataclass(frozen=True)
class ServeOptions:
    """What ``rlmem serve``'s flags set (``extra``: more ``vllm serve`` flags, passed as given)."""

    model: str
    eviction: EvictionConfig = field(default_factory=EvictionConfig)   # every request's default
    interoception: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str | None = None             # bfloat16 on CUDA, float32 on CPU
    seed: int = 0
    num_kv_blocks: int | None = None     # vLLM's num_gpu_blocks_override: a fixed KV pool
    max_num_seqs: int = 256
    max_model_len: int | None = None
    kv_cache_gib: int = 1                # VLLM_CPU_KVCACHE_SPACE on CPU (unless already set)
    shutdown_timeout: int = 30           # seconds in-flight requests get after SIGTERM
    extra: tuple[str, ...] = ()


def vllm_argv(o: ServeOptions) -> list[str]:
    """The ``vllm serve`` flags of ``o``; settings the engine cannot run are refused here (ValueError)."""
    cuda = cuda_present()
    dtype = engine_dtype(o.dtype, cuda=cuda)
    b = o.eviction.block_size
    check_block_size(b, cuda=cuda)
    check_eviction(o.eviction, b)
    defaults = ServeDefaults(o.eviction, b, o.interoception)
    argv = ["--model", str(o.model), "--host", o.host, "--port", str(o.port), "--dtype", dtype,
            "--seed", str(o.seed), "--block-size", str(b), "--no-enable-prefix-caching",
            "--scheduler-cls", SCHEDULER, "--worker-extension-cls", WORKER_EXTENSION,
            "--middleware", MIDDLEWARE, "--additional-config", json.dumps(defaults.to_additional_config()),
            "--max-num-seqs", str(o.max_num_seqs), "--no-async-scheduling", "--enforce-eager",
            "--shutdown-timeout", str(o.shutdown_timeout), "--api-server-count", "1"]
    if o.num_kv_blocks:
        argv += ["--num-gpu-blocks-override", str(o.num_kv_blocks)]
    if o.max_model_len:
        argv += ["--max-model-len", str(o.max_model_len)]
    return argv + list(o.extra)


def serve(o: ServeOptions) -> int:
    """Run the server in this process until SIGTERM/SIGINT; 0 after a clean stop."""
    argv = vllm_argv(o)
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"    # the V1 runner: the one rlmem's hooks wrap
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(o.kv_cache_gib))
    # rlmem's metrics are made in the engine-core process: both processes write to one directory,
    # which vLLM's /metrics reads. It must be set before anything imports prometheus_client.
    own_dir = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        own_dir = tempfile.mkdtemp(prefix="rlmem-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        import uvloop
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        from rlmem.engine.vllm.internals import check_classes
        from rlmem.engine.vllm.version import require_pinned

        require_pinned()
        check_classes("cuda" if cuda_present() else "cpu")
        cli_env_setup()
        args = make_arg_parser(FlexibleArgumentParser(prog="rlmem serve")).parse_args(argv)
        validate_parsed_serve_args(args)
        uvloop.run(_run(args, o.seed))
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


async def _run(args, seed: int) -> None:
    """vLLM's ``run_server`` (vllm/entrypoints/launchers/api_server/entry.py) plus the hook install."""
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve, build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server

    def interrupt(*_) -> None:        # SIGTERM before uvicorn installs its own handlers
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    listen_address, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as client:
            info = (await client.collective_rpc("rlmem_install", args=(seed,)))[0]
            print(f"rlmem serve: NGC hooks installed ({info['num_layers']} attention layers, KV block size "
                  f"{info['block_size']}, {info['num_kv_blocks']} KV blocks, cache layout {info['layout']})",
                  flush=True)
            shutdown_task = await build_and_serve(client, listen_address, sock, args)
        await shutdown_task
    finally:
        sock.close()


# ---------------------------------------------------------------------- a server as a child process
@dataclass
class ServerHandle:
    """A running ``rlmem serve`` child process (its own process group)."""

    process: subprocess.Popen
    url: str                  # http://HOST:PORT (the OpenAI base URL is url + "/v1")
    log_path: Path            # the server's stdout and stderr
    model: str                # the served model name (requests' "model")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until ``/v1/models`` answers; RuntimeError with the log's tail if the server died or
        did not answer in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rlmem serve exited with {self.process.returncode} before it was ready:\n"
                                   f"{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"rlmem serve did not answer within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        """The ``rlmem_*`` samples of ``/metrics`` (Prometheus text), e.g. ``rlmem_freed_blocks_total``,
        ``rlmem_request_peak_kv_blocks_sum``, ``rlmem_request_peak_kv_blocks_bucket{le="8.0"}``."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return parse_metrics(r.read().decode(), prefix="rlmem_")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole process group; the exit code
        (negative: killed by that signal)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)   # anything the server left behind
        except (ProcessLookupError, PermissionError):
            pass
        return self.process.wait()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_metrics(text: str, prefix: str = "") -> dict[str, float]:
    """``{"name{labels}": value}`` of a Prometheus text page (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefix):
            continue
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def start(model: str, *, eviction: EvictionConfig | None = None, interoception: bool = False, port: int | None = None,
          host: str = "127.0.0.1", num_kv_blocks: int | None = None, max_num_seqs: int = 256,
          max_model_len: int | None = None, dtype: str | None = None, seed: int = 0, kv_cache_gib: int = 1,
          shutdown_timeout: int = 30, extra: list[str] | tuple[str, ...] = (), log_path: str | Path | None = None,
          env: dict[str, str] | None = None) -> ServerHandle:
    """Start ``rlmem serve`` as a child process (a new process group) and return at once; call
    :meth:`ServerHandle.wait_ready` next. Settings it would refuse raise ValueError here, before
    anything starts. ``port`` None: a free loopback port."""
    o = ServeOptions(str(model), eviction or EvictionConfig(), interoception, host, port or free_port(host), dtype,
                     seed, num_kv_blocks, max_num_seqs, max_model_len, kv_cache_gib, shutdown_timeout, tuple(extra))
    vllm_argv(o)   # refuse before starting a process
    cmd = [sys.executable, "-m", "rlmem.cli", "serve", *options_argv(o)]
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="rlmem-serve-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
    return ServerHandle(proc, f"http://{host}:{o.port}", log_path, str(model))


def options_argv(o: ServeOptions) -> list[str]:
    """The ``rlmem serve`` command line of ``o`` (the inverse of the command's flags)."""
    e = o.eviction
    argv = ["--model", o.model, "--host", o.host, "--port", str(o.port), "--seed", str(o.seed),
            "--eps", repr(float(e.eps)), "--delta", str(e.delta), "--block-size", str(e.block_size),
            "--window", str(e.window), "--protect-recent", str(e.protect_recent),
            "--score-transform", e.score_transform, "--tau", repr(float(e.tau)), "--scorer", e.scorer,
            "--max-num-seqs", str(o.max_num_seqs), "--kv-cache-gib", str(o.kv_cache_gib),
            "--shutdown-timeout", str(o.shutdown_timeout)]
    for k, v in e.scorer_args.items():
        argv += ["--scorer-arg", f"{k}={v}"]
    if o.interoception:
        argv.append("--interoception")
    if o.dtype:
        argv += ["--dtype", o.dtype]
    if o.num_kv_blocks:
        argv += ["--kv-blocks", str(o.num_kv_blocks)]
    if o.max_model_len:
        argv += ["--max-model-len", str(o.max_model_len)]
    if o.extra:
        argv += ["--", *o.extra]
    return argv

"""``rlmem serve``: vLLM's OpenAI-compatible API server with NGC eviction inside the engine (docs/serving.md)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlmem.commands.common import add_eviction_args, at_least
    from rlmem.engine.registry import engine_traits

    p = sub.add_parser("serve", help="serve a model through vLLM's OpenAI-compatible API with NGC eviction",
                       description="vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                       "/metrics) with rlmem's scheduler and worker hooks. The eviction flags are every "
                       "request's default; a request sets its own with \"vllm_xargs\": {\"eviction_eps\": 0.5} "
                       "(any eviction field, prefixed eviction_; eps 0: full cache). Evictions are top-k "
                       "(evaluation mode). Flags after -- go to vllm serve unchanged.")
    p.add_argument("--model", required=True, help="local HF model directory")
    add_eviction_args(p)
    p.add_argument("--interoception", action="store_true",
                   help="append the eviction-rate tag <eviction_rate>P%%</eviction_rate> to each ε > 0 prompt, "
                        "as training with interoception did (text prompts to /v1/completions only)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    g.add_argument("--port", type=at_least(1), default=8000)
    g.add_argument("--dtype", default=None, choices=list(engine_traits("vllm").dtypes), help="default bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--kv-blocks", type=at_least(1), default=None,
                   help="a fixed number of KV blocks (vLLM's --num-gpu-blocks-override)")
    g.add_argument("--max-num-seqs", type=at_least(1), default=256, help="most sequences running at once")
    g.add_argument("--max-model-len", type=at_least(1), default=None)
    g.add_argument("--kv-cache-gib", type=at_least(1), default=1, help="CPU only: KV cache memory (GiB)")
    g.add_argument("--shutdown-timeout", type=at_least(0), default=30,
                   help="seconds in-flight requests get to finish after SIGTERM (then aborted)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then more vllm serve flags")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Every flag is checked before vLLM starts; the server then runs until SIGTERM or Ctrl-C."""
    from pathlib import Path

    from rlmem.commands.common import CommandError, as_flags, eviction_from_args

    cfg = eviction_from_args(args)
    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if extra and not extra[0].startswith("-"):
        raise CommandError(f"unexpected argument {extra[0]!r} (vllm serve flags go after --)")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise CommandError(f"--model {args.model}: " + ("not found" if not model.exists() else
                                                         "no config.json (a local HF model directory is expected)"))
    _check_listen(args.host, args.port)
    from rlmem.engine.registry import engine_unavailable_reason

    why = engine_unavailable_reason("vllm")
    if why is not None:
        raise CommandError(f"rlmem serve needs vLLM: {why}")
    from rlmem.serving.server import ServeOptions, serve, vllm_argv

    o = ServeOptions(str(model), cfg, args.interoception, args.host, args.port, args.dtype, args.seed, args.kv_blocks,
                     args.max_num_seqs, args.max_model_len, args.kv_cache_gib, args.shutdown_timeout, tuple(extra))
    try:
        vllm_argv(o)
    except ValueError as e:
        raise CommandError(as_flags(str(e), "eviction")) from None
    return serve(o)


def _check_listen(host: str, port: int) -> None:
    """A port already taken is one line here, not vLLM's traceback after the model loaded."""
    import socket

    from rlmem.commands.common import CommandError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CommandError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise CommandError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None

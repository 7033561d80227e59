"""``rlmem serve``'s pieces without a server: the per-request translation, the 400 middleware, the
interoception tag, the launcher's vLLM arguments. (The real server: tests/test_serve.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from rlmem.data.templates import build_prompt
from rlmem.engine.vllm.requests import RequestNGC, to_extra_args
from rlmem.engine.vllm.served import ServeDefaults, eviction_from_xargs, settings_of
from rlmem.eviction.policy import EvictionConfig
from rlmem.serving.middleware import EvictionArgs, prepare

SERVER = EvictionConfig(delta=64, eps=0.5, block_size=32, window=5)
D = ServeDefaults(SERVER, 32)


def test_xargs_override_the_servers_defaults_field_by_field():
    assert eviction_from_xargs(None, D) == SERVER
    assert eviction_from_xargs({"eviction_eps": 0.75, "other_plugin_key": 3}, D) == EvictionConfig(
        delta=64, eps=0.75, block_size=32, window=5)
    assert eviction_from_xargs({"eviction_eps": 0}, D) is None                 # full cache
    assert eviction_from_xargs({"eviction_delta": 128, "eviction_window": 8}, D).delta == 128
    snap = eviction_from_xargs({"eviction_scorer": "snapkv", "eviction_scorer_args": ["kernel_size=3"]}, D)
    assert snap.scorer == "snapkv" and snap.scorer_args["kernel_size"] == 3
    off = ServeDefaults(EvictionConfig(eps=0, delta=64, window=5), 32)          # server default: full cache
    assert eviction_from_xargs({}, off) is None and eviction_from_xargs({"eviction_eps": 0.5}, off).eps == 0.5


@pytest.mark.parametrize("xargs, message", [
    ({"eviction_eps": 1.5}, "vllm_xargs.eviction_eps: must be in (0, 1], or 0 for a full cache (got 1.5)"),
    ({"eviction_eps": "half"}, "vllm_xargs.eviction_eps: must be in (0, 1]"),
    ({"eviction_epz": 0.5}, "vllm_xargs.eviction_epz: unknown eviction setting (known: eviction_delta, eviction_eps"),
    ({"eviction_block_size": 64, "eviction_delta": 128}, "vllm_xargs.eviction_block_size=64 but this vLLM engine "
                                                         "runs with KV block size 32"),
    ({"eviction_protect_recent": 0}, "vllm_xargs.eviction_protect_recent=0 is not supported"),
    ({"eviction_delta": 3}, "vllm_xargs.eviction_delta (3) must be >= vllm_xargs.eviction_window (5)"),
    ({"eviction_scorer_args": ["sinks"]}, "vllm_xargs.eviction_scorer_args: expected 'KEY=VALUE'"),
])
def test_a_bad_setting_is_one_line_naming_the_request_key(xargs, message):
    with pytest.raises(ValueError) as e:
        eviction_from_xargs(xargs, D)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_engine_side_settings_offline_and_served():
    offline = SimpleNamespace(extra_args=to_extra_args("k1", SERVER, False))
    assert settings_of(offline, D) == RequestNGC("k1", SERVER, False)           # the offline engine's own
    assert settings_of(offline, None) == RequestNGC("k1", SERVER, False)
    served = settings_of(SimpleNamespace(extra_args={"eviction_eps": 0.75}), D)
    assert served.key is None and served.greedy and served.config.eps == 0.75  # serving is evaluation: top-k
    assert settings_of(SimpleNamespace(extra_args=None), None) is None           # not an rlmem request
    assert ServeDefaults.from_additional_config(D.to_additional_config()) == D
    assert ServeDefaults.from_additional_config({}) is None


def test_a_bad_setting_that_reaches_the_engine_runs_full_cache_not_a_crash(caplog):
    with caplog.at_level(logging.WARNING):
        s = settings_of(SimpleNamespace(extra_args={"eviction_eps": 7}), D)
    assert s.config is None and "vllm_xargs.eviction_eps" in caplog.text


def test_interoception_tag_goes_where_training_puts_it():
    tagged = ServeDefaults(SERVER, 32, interoception=True)
    ex = {"prompt": "3 5 7 : 22", "task": "countdown-toy"}
    text = build_prompt(ex, None, template="plain")
    body = {"prompt": text, "vllm_xargs": {"eviction_eps": 0.75}}
    assert prepare(body, "/v1/completions", tagged)
    assert body["prompt"] == build_prompt(ex, None, template="plain", eviction_rate=0.75)
    assert body["prompt"].endswith("<eviction_rate>75%</eviction_rate>")
    body = {"prompt": [text, text]}                                       # the server's default ε 0.5
    assert prepare(body, "/v1/completions", tagged) and all(p.endswith("<eviction_rate>50%</eviction_rate>")
                                                            for p in body["prompt"])
    body = {"prompt": text, "vllm_xargs": {"eviction_eps": 0}}            # full cache: no tag
    assert not prepare(body, "/v1/completions", tagged) and body["prompt"] == text
    assert not prepare({"prompt": text}, "/v1/completions", D)            # no --interoception: untouched
    with pytest.raises(ValueError, match="chat template"):
        prepare({"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions", tagged)
    with pytest.raises(ValueError, match="token ids"):
        prepare({"prompt": [1, 2, 3]}, "/v1/completions", tagged)
    assert not prepare({"prompt": text}, "/tokenize", tagged)              # no generation there: untouched


def _asgi(app, method: str, path: str, body: bytes, extra_config: dict, api_key: list[str] | None = None,
          auth: str | None = None) -> tuple[int, bytes, list]:
    """One request through ``app``; returns (status, response body, what the inner app received)."""
    state = SimpleNamespace(args=SimpleNamespace(additional_config=extra_config, api_key=api_key))
    scope = {"type": "http", "method": method, "path": path, "app": SimpleNamespace(state=state),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
             + ([(b"authorization", auth.encode())] if auth else [])}
    halves = [{"type": "http.request", "body": body[:5], "more_body": True},
              {"type": "http.request", "body": body[5:], "more_body": False}]
    sent: list = []

    async def receive():
        return halves.pop(0) if halves else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), sent


def test_the_middleware_answers_400_or_hands_vllm_the_checked_body():
    seen = {}

    async def inner(scope, receive, send):
        chunks, more = [], True
        while more:
            m = await receive()
            chunks.append(m.get("body", b""))
            more = m.get("more_body", False)
        seen["body"] = b"".join(chunks)
        seen["length"] = dict(scope["headers"])[b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = EvictionArgs(inner)
    cfg = ServeDefaults(SERVER, 32, interoception=True).to_additional_config()
    bad = json.dumps({"prompt": "x", "stream": True, "vllm_xargs": {"eviction_eps": 1.5}}).encode()
    status, body, _ = _asgi(app, "POST", "/v1/completions", bad, cfg)
    assert status == 400 and "body" not in seen
    err = json.loads(body)["error"]
    assert err["code"] == 400 and err["message"].startswith("vllm_xargs.eviction_eps: must be in (0, 1]")
    good = json.dumps({"prompt": "x", "vllm_xargs": {"eviction_eps": 0.25}}).encode()
    status, body, _ = _asgi(app, "POST", "/v1/completions", good, cfg)
    assert status == 200 and json.loads(seen["body"])["prompt"] == "x<eviction_rate>25%</eviction_rate>"
    assert int(seen["length"]) == len(seen["body"])
    status, _, _ = _asgi(app, "POST", "/v1/completions", b"not json", cfg)   # vLLM's own validation answers
    assert status == 200 and seen["body"] == b"not json"
    status, _, _ = _asgi(app, "POST", "/v1/completions", bad, {})            # not an rlmem server: untouched
    assert status == 200 and seen["body"] == bad


def test_with_an_api_key_an_unauthenticated_request_reaches_vllms_401_unread():
    """vLLM's authentication runs inside this middleware: a request it will refuse is handed on
    untouched (so the client gets 401, not a 400 about its eviction settings); with the key, the
    settings are checked as usual."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = EvictionArgs(AuthenticationMiddleware(ok, ["s3cret"]))
    cfg = ServeDefaults(SERVER, 32).to_additional_config()
    bad = json.dumps({"prompt": "x", "vllm_xargs": {"eviction_eps": 1.5}}).encode()
    assert _asgi(app, "POST", "/v1/completions", bad, cfg, ["s3cret"])[0] == 401
    assert _asgi(app, "POST", "/v1/completions", bad, cfg, ["s3cret"], "Bearer wrong")[0] == 401
    assert _asgi(app, "POST", "/v1/completions", bad, cfg, ["s3cret"], "Bearer s3cret")[0] == 400
    good = json.dumps({"prompt": "x", "vllm_xargs": {"eviction_eps": 0.5}}).encode()
    assert _asgi(app, "POST", "/v1/completions", good, cfg, ["s3cret"], "Bearer s3cret")[0] == 200


def test_the_launcher_runs_vllms_server_with_rlmems_classes():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from rlmem.serving.server import MIDDLEWARE, SCHEDULER, ServeOptions, options_argv, vllm_argv

    o = ServeOptions("/m", SERVER, interoception=True, port=9123, num_kv_blocks=64, extra=("--max-num-batched-tokens", "512"))
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_argv(o))
    assert (args.model, args.port, args.block_size, args.num_gpu_blocks_override) == ("/m", 9123, 32, 64)
    assert args.enable_prefix_caching is False and args.async_scheduling is False and args.enforce_eager
    assert args.scheduler_cls == SCHEDULER and args.middleware == [MIDDLEWARE]
    assert args.worker_extension_cls == "rlmem.engine.vllm.worker.NGCWorkerExtension"
    assert args.max_num_batched_tokens == 512
    assert ServeDefaults.from_additional_config(args.additional_config) == ServeDefaults(SERVER, 32, True)
    # the child command line start() runs parses back to the same options
    from rlmem.cli import build_parser
    from rlmem.commands.common import eviction_from_args

    ns = build_parser().parse_args(["serve", *options_argv(o)])
    assert eviction_from_args(ns) == SERVER and ns.interoception and ns.kv_blocks == 64 and ns.port == 9123
    assert ns.vllm_args[-2:] == ["--max-num-batched-tokens", "512"]
    with pytest.raises(ValueError, match="multiple of 32"):
        vllm_argv(ServeOptions("/m", EvictionConfig(block_size=16)))


def test_a_port_in_use_is_one_error_line(tiny_model_dir, capsys):
    import socket

    from rlmem.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err

"""ASGI middleware of ``rlmem serve`` (vLLM's ``--middleware``): checks a request's eviction settings first.

Every JSON ``POST`` whose body has ``vllm_xargs`` is checked with the translation the engine runs
(:func:`rlmem.engine.vllm.served.eviction_from_xargs`); a bad setting gets HTTP 400 with one line
naming the key (``vllm_xargs.eviction_eps: ...``) before vLLM parses the request, streaming or not,
and the server goes on serving. Checking here, not in the engine, matters: an exception in the
engine core's scheduler would stop the engine for every request.

With ``--interoception`` a request that runs with ε > 0 gets the rate tag where training put it,
at the very end of the prompt text (rlmem.data.templates.build_prompt, ``tag_position="end"``):
``/v1/completions`` text prompts get it appended. A chat request cannot (vLLM applies the chat
template after this point, so the tag would land before the generation prompt), so it is
refused with the reason, as ``rlmem eval --interoception`` refuses ``messages`` problems.

The server's defaults come from vLLM's ``additional_config`` (``app.state.args``), the same
settings the engine reads, so both ends agree.

vLLM adds ``--middleware`` classes outside its own, so this one runs before ``--api-key``
authentication. A request that authentication will refuse is therefore handed on untouched
(unread): it gets vLLM's 401, never a 400 that would tell an unauthenticated client anything
about its eviction settings. The key check is vLLM's own (``AuthenticationMiddleware.verify_token``).
"""

from __future__ import annotations

import json
import os

from rlmem.data.templates import interoception_tag
from rlmem.engine.vllm.served import ServeDefaults, eviction_from_xargs

COMPLETIONS = "/v1/completions"
# Other routes that generate from a prompt the middleware cannot tag where training did.
UNTAGGABLE = ("/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses", "/v1/messages",
              "/inference/v1/generate")


def _defaults(scope) -> ServeDefaults | None:
    app = scope.get("app")
    args = getattr(getattr(app, "state", None), "args", None)
    extra = getattr(args, "additional_config", None)
    if isinstance(extra, str):
        extra = json.loads(extra)
    return ServeDefaults.from_additional_config(extra)


def _refused_by_auth(scope) -> bool:
    """True when vLLM's ``--api-key`` check (the next layer in) will answer 401."""
    args = getattr(getattr(scope.get("app"), "state", None), "args", None)
    # vLLM's rule (vllm/entrypoints/serve/middleware/register.py): --api-key, else VLLM_API_KEY
    tokens = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
    if not tokens:
        return False
    from starlette.datastructures import Headers
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX, AuthenticationMiddleware

    path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
    return path.startswith(GUARDED_PREFIX) and not AuthenticationMiddleware(None, tokens).verify_token(Headers(scope=scope))


def prepare(body: dict, path: str, defaults: ServeDefaults) -> bool:
    """Check ``body``'s eviction settings and add the interoception tag; True when ``body`` changed.

    Raises ``ValueError`` (one line) for a request the server refuses.
    """
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return False                       # vLLM's own validation answers this one
    cfg = eviction_from_xargs(xargs, defaults)
    if not defaults.interoception or cfg is None:
        return False
    tag = interoception_tag(cfg.eps)
    prompt = body.get("prompt")
    if path.rstrip("/").endswith(COMPLETIONS):
        if isinstance(prompt, str):
            body["prompt"] = prompt + tag
            return True
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            body["prompt"] = [p + tag for p in prompt]
            return True
        raise ValueError("prompt: this server runs with --interoception, which appends the eviction-rate tag "
                         "to the prompt text; send the prompt as text, not token ids")
    if not path.rstrip("/").endswith(UNTAGGABLE):
        return False                       # no generation here (/tokenize, ...)
    raise ValueError(f"{path}: this server runs with --interoception, whose eviction-rate tag goes at the very "
                     f"end of the prompt, after the chat template, as in training; send the templated text to "
                     f"{COMPLETIONS} (or set vllm_xargs.eviction_eps to 0)")


class EvictionArgs:
    """Pure ASGI middleware (the request body is read once and replayed to vLLM)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        defaults = _defaults(scope)
        if defaults is None or _refused_by_auth(scope):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":     # the client went away
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = None                               # not JSON: vLLM's own validation answers
        if isinstance(body, dict):
            try:
                if prepare(body, scope.get("path", ""), defaults):
                    raw = json.dumps(body).encode()
                    scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                                 + [(b"content-length", str(len(raw)).encode())])
            except ValueError as e:
                return await _bad_request(send, str(e))
        return await self.app(scope, _replay([{"type": "http.request", "body": raw, "more_body": False}], receive), send)


def _replay(messages: list[dict], receive):
    """``messages`` first, then the client's own (a streaming response waits on it for a disconnect)."""
    queue = list(messages)

    async def replayed():
        if queue:
            return queue.pop(0)
        return await receive()
    return replayed


async def _bad_request(send, message: str) -> None:
    """HTTP 400 in vLLM's (OpenAI's) error shape."""
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": "vllm_xargs",
                                    "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})

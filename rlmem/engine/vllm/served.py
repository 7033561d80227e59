"""The eviction settings of a request sent to ``rlmem serve``: ``vllm_xargs`` keys over the server's defaults.

A served request names any :class:`~rlmem.eviction.policy.EvictionConfig` field with the prefix
``eviction_`` in vLLM's per-request extra arguments (``"vllm_xargs": {"eviction_eps": 0.5}``, which
vLLM copies into ``SamplingParams.extra_args``); the fields it leaves out take the server's
defaults (its flags). :func:`eviction_from_xargs` is the one translation: the API server's
middleware runs it to refuse a bad request with HTTP 400 before vLLM sees it, and the scheduler and
the worker run it again (:func:`settings_of`) to get the same :class:`.requests.RequestNGC`.

The defaults reach the engine-core process through vLLM's ``additional_config`` engine argument
(key ``"rlmem"``), which the scheduler and the worker both read from their ``vllm_config``.
Serving is evaluation: evictions are the plain top-k of the policy's scores (no Gumbel noise).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

from rlmem.engine.vllm.engine import check_eviction
from rlmem.engine.vllm.requests import KEY, RequestNGC, from_sampling_params
from rlmem.eviction.policy import EVICTION_FIELDS, EvictionConfig

PREFIX = "eviction_"
CONFIG_KEY = "rlmem"      # additional_config["rlmem"]: the server's defaults


@dataclass(frozen=True)
class ServeDefaults:
    """What ``rlmem serve``'s flags set for every request."""

    eviction: EvictionConfig     # eps 0: full cache unless a request asks for eviction
    block_size: int              # vLLM's KV block size (NGC's b must equal it)
    interoception: bool = False  # tag each ε > 0 prompt with its rate, as training with interoception did

    def to_additional_config(self) -> dict:
        return {CONFIG_KEY: {"eviction": self.eviction.to_dict(), "block_size": self.block_size,
                             "interoception": self.interoception}}

    @classmethod
    def from_additional_config(cls, additional_config) -> ServeDefaults | None:
        """None: the engine was not started by ``rlmem serve`` (the offline engine, a test)."""
        d = (additional_config or {}).get(CONFIG_KEY) if isinstance(additional_config, dict) else None
        if not d:
            return None
        return cls(EvictionConfig(**d["eviction"]), int(d["block_size"]), bool(d.get("interoception", False)))


def _named(message: str) -> str:
    """``eviction.eps: ...`` -> ``vllm_xargs.eviction_eps: ...`` (the request's own key)."""
    return re.sub(r"\beviction\.(\w+)", r"vllm_xargs.eviction_\1", message)


def _scorer_args(value) -> dict:
    """``["sinks=8"]`` (vllm_xargs values cannot be objects) -> ``{"sinks": "8"}``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"vllm_xargs.eviction_scorer_args: expected a list of 'KEY=VALUE' strings (got {value!r})")
    out = {}
    for item in items:
        key, sep, v = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"vllm_xargs.eviction_scorer_args: expected 'KEY=VALUE' (got {item!r})")
        out[key.strip()] = v.strip()
    return out


def eviction_from_xargs(xargs: dict | None, defaults: ServeDefaults) -> EvictionConfig | None:
    """The request's eviction settings (None: full cache); one ``ValueError`` line naming the key otherwise.

    Other extra arguments (not ``eviction_*``) are left to whoever reads them.
    """
    updates = {}
    for key, value in (xargs or {}).items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name not in EVICTION_FIELDS:
            known = ", ".join(PREFIX + f for f in EVICTION_FIELDS)
            raise ValueError(f"vllm_xargs.{key}: unknown eviction setting (known: {known})")
        updates[name] = _scorer_args(value) if name == "scorer_args" else value
    if "scorer" in updates and "scorer_args" not in updates and updates["scorer"] != defaults.eviction.scorer:
        updates["scorer_args"] = {}   # the server's scorer settings belong to the server's scorer
    try:
        cfg = dataclasses.replace(defaults.eviction, **updates)
        if not cfg.enabled:
            return None
        check_eviction(cfg, defaults.block_size)
    except (ValueError, TypeError) as e:
        raise ValueError(_named(str(e))) from None
    return cfg


def settings_of(sampling_params, defaults: ServeDefaults | None) -> RequestNGC | None:
    """What the scheduler and the worker run a request with: the offline engine's own settings
    (``extra_args["rlmem"]``), else, in a served engine, the request's ``vllm_xargs`` over the
    defaults, with top-k evictions and no kept decisions (``key`` None)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if KEY in extra or defaults is None:
        return from_sampling_params(sampling_params)
    try:
        cfg = eviction_from_xargs(extra, defaults)
    except ValueError as e:
        # The API server's middleware refuses these with HTTP 400 before they reach the engine; an
        # exception here would stop the engine for every request, so a request that got through
        # some other way runs with a full cache and says so in the log.
        logging.getLogger(__name__).warning("rlmem: %s; this request runs with a full cache", e)
        cfg = None
    return RequestNGC(None, cfg, greedy=True)

"""Reward registry: name -> reward function with TRL's reward-function signature.

A reward function is ``fn(completions, **columns) -> list[float]``: ``completions`` is a list of
strings or of chat message lists (TRL's conversational format), and ``columns`` are the dataset
example fields as lists over the batch (plus whatever else TRL passes, e.g. ``prompts``,
``completion_ids``, ``trainer_state``; unknown keyword arguments must be accepted and ignored).

Users add their own with ``@register_reward("name")`` and select it by name from a config.
"""

from __future__ import annotations

import importlib
import threading
from typing import Callable

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}
_LOCK = threading.Lock()


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
    """Register ``fn`` under ``name``; usable as ``@register_reward("name")``."""
    if not isinstance(name, str) or not name:
        raise ValueError("reward name must be a non-empty string")

    def deco(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r} is not callable: {f!r}")
        with _LOCK:
            if name in _REGISTRY and _REGISTRY[name] is not f and not overwrite:
                raise ValueError(f"reward {name!r} is already registered (pass overwrite=True to replace it)")
            _REGISTRY[name] = f
        return f

    return deco(fn) if fn is not None else deco


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``.

    ``name`` may also be ``"package.module:function"``, imported on demand (so a config can name a
    user's reward without a registration import). Unknown names raise ``KeyError`` listing the
    registered ones.
    """
    with _LOCK:
        fn = _REGISTRY.get(name)
    if fn is not None:
        return fn
    if isinstance(name, str) and ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"cannot import reward {name!r}: {e}") from e
        if not callable(fn):
            raise KeyError(f"reward {name!r} is not callable")
        return fn
    raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(list_rewards()) or '(none)'}")


def list_rewards() -> list[str]:
    with _LOCK:
        return sorted(_REGISTRY)

"""The scorer seam: what an eviction scorer sees, what it returns, and the registry of scorers.

Every scorer runs behind the same NGC schedule (docs/design.md section 1: rounds, blocks, keep
count, protected newest blocks); only the per-key scores differ. NGC's scorer is *learned*: its
block logits are an action of the policy (Gumbel-top-k in training, a Plackett-Luce log-prob
the learner recomputes). Every other scorer is a fixed heuristic: deterministic top-k of its block
scores, log-prob 0.0 in the record (docs/design.md section 2).

Add a scorer: one file in this package with a ``Scorer`` subclass decorated with
``@register_scorer``, imported in ``scorers/__init__.py``. A scorer's own settings (SnapKV's
pooling kernel, R-KV's λ, StreamingLLM's sinks) are its ``__init__``'s keyword parameters with
defaults: :meth:`Scorer.settings` lists them, the run config's ``eviction.scorer_args`` and the CLI's
``--scorer-arg KEY=VALUE`` set them (checked by :func:`check_scorer_args`), and every engine builds
its scorer with them (``get_scorer(cfg.scorer, **cfg.scorer_args)``).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch


@dataclass
class ScoringInputs:
    """One round's scoring problem for ``B`` rows of one layer.

    queries ``[B, Hq, w, d]``: post-RoPE queries of the window (oldest first).
    keys ``[B, Hkv, C, d]``: post-RoPE alive keys, slot order == position order.
    valid ``[B, C]``: which slots hold alive keys.
    positions ``[B, C]``: true positions of the keys (-1 where not valid).
    state ``[B, C]`` or None: per-key state of scorers that observe every step (H2O).
    prompt_lens ``[B]`` or None: each row's prompt length, for rules that treat the question apart
    (``streamingllm_prompt``). Every engine passes it; a hand-built input may leave it out.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    scaling: float
    layer: int = 0
    state: torch.Tensor | None = None
    prompt_lens: torch.Tensor | None = None


class Scorer:
    """Per-key scores, higher = keep. Subclasses set ``name`` and implement :meth:`scores`."""

    name: ClassVar[str] = ""
    learned: ClassVar[bool] = False    # the policy's own action (Gumbel-top-k + Plackett-Luce)
    observes: ClassVar[bool] = False   # needs :meth:`observe` on every forward step

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """This scorer's own settings and their defaults: its ``__init__``'s keyword parameters."""
        if cls.__init__ is object.__init__:
            return {}
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def scores(self, inp: ScoringInputs) -> torch.Tensor:   # [B, C]
        raise NotImplementedError

    def observe(self, query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float,
                state: torch.Tensor | None) -> torch.Tensor:
        """Update the per-key state ``[B, C]`` after a forward step.

        query ``[B, Hq, q, d]`` (the step's new queries), keys ``[B, Hkv, C, d]`` (the cache after the
        step's keys were written), visible ``[B, q, C]`` (which keys each new query attends to).
        """
        raise NotImplementedError(f"scorer {self.name!r} does not observe steps")


def window_attention(queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of each query on the visible keys, per KV group: ``[B, Hkv, G, q, C]``.

    queries ``[B, Hq, q, d]``, keys ``[B, Hkv, C, d]``, visible ``[B, C]`` (the same keys for every
    query) or ``[B, q, C]``. Query head ``h`` uses KV head ``h // G`` (GQA); invisible keys get 0.
    """
    bsz, hq, q, d = queries.shape
    hkv = keys.shape[1]
    group = hq // hkv
    qg = queries.reshape(bsz, hkv, group * q, d)
    logits = torch.matmul(qg, keys.transpose(-1, -2)) * scaling          # [B, Hkv, G*q, C]
    logits = logits.reshape(bsz, hkv, group, q, -1)
    vis = visible[:, None, None, None, :] if visible.dim() == 2 else visible[:, None, None, :, :]
    probs = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1)
    return probs.masked_fill(~vis, 0.0)


_REGISTRY: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make ``cls`` available by ``cls.name`` (config ``eviction.scorer``, ``--scorer``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a scorer needs a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"scorer {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def scorer_names() -> list[str]:
    return sorted(_REGISTRY)


class ScorerArgs(dict):
    """A scorer's settings, ``{name: value}``: an immutable dict that hashes, so an
    :class:`~rlmem.eviction.policy.EvictionConfig` holding it stays frozen and comparable."""

    def __hash__(self) -> int:   # type: ignore[override]
        return hash(tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in self.items())))

    def __reduce__(self):
        return ScorerArgs, (dict(self),)

    def _immutable(self, *args, **kwargs):
        raise TypeError("ScorerArgs is immutable: build a new EvictionConfig (dataclasses.replace)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _immutable


def _scorer_class(name: str) -> type[Scorer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction scorer {name!r}; registered: {', '.join(scorer_names())}") from None


_KINDS = {int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, default: Any, where: str) -> Any:
    """``value`` as the type of the setting's default; strings (CLI ``KEY=VALUE``) are parsed."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{where}: expected true or false (got {value!r})")
            return text.lower() in ("true", "1")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: expected {_KINDS.get(kind, kind.__name__)} (got {value!r})") from None
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false (got {value!r})")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where}: expected an integer (got {value!r})")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number (got {value!r})")
        return float(value)
    return value


def check_scorer_args(name: str, args: Mapping[str, Any] | None) -> ScorerArgs:
    """``args`` checked against scorer ``name``'s declared settings and converted to their types.

    A ValueError names ``eviction.scorer_args``, the scorer and the key: an unknown key (listing the
    scorer's settings), a value of the wrong type, or one the scorer itself refuses.
    """
    cls = _scorer_class(name)
    if args is None:
        return ScorerArgs()
    if not isinstance(args, Mapping):
        raise ValueError(f"eviction.scorer_args: expected a mapping of {name}'s settings (got {args!r})")
    declared = cls.settings()
    out = {}
    for key, value in args.items():
        if key not in declared:
            has = f"its settings: {', '.join(declared)}" if declared else "it has no settings"
            raise ValueError(f"eviction.scorer_args: scorer {name!r} has no setting {key!r} ({has})")
        out[key] = _coerce(value, declared[key], f"eviction.scorer_args: scorer {name!r}, setting {key!r}")
    try:
        cls(**out)
    except (ValueError, TypeError) as e:
        raise ValueError(f"eviction.scorer_args: {e}") from None
    return ScorerArgs(sorted(out.items()))


def get_scorer(name: str, **kwargs) -> Scorer:
    """Scorer ``name`` with its settings ``kwargs`` (the rest at their defaults), checked as
    :func:`check_scorer_args` does."""
    return _scorer_class(name)(**check_scorer_args(name, kwargs))


def is_learned(name: str) -> bool:
    """Whether records made with scorer ``name`` carry real eviction log-probs (replayed by the learner)."""
    return get_scorer(name).learned

"""The scorer seam: what an eviction scorer sees, what it returns, and the registry of scorers.

Every scorer runs behind the same NGC schedule (docs/design.md section 1: rounds, blocks, keep
count, protected newest blocks); only the per-key scores differ. NGC's scorer is *learned*: its
block logits are an action of the policy (Gumbel-top-k in training, a Plackett-Luce log-prob
the learner recomputes). Every other scorer is a fixed heuristic: deterministic top-k of its block
scores, log-prob 0.0 in the record (docs/design.md section 2).

Add a scorer: one file in this package with a ``Scorer`` subclass decorated with
``@register_scorer``, imported in ``scorers/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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


def get_scorer(name: str, **kwargs) -> Scorer:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction scorer {name!r}; registered: {', '.join(scorer_names())}") from None
    return cls(**kwargs)


def is_learned(name: str) -> bool:
    """Whether records made with scorer ``name`` carry real eviction log-probs (replayed by the learner)."""
    return get_scorer(name).learned

"""The clipping rule, checked here only (torch-free: the run-config checks use it before torch).

:class:`rlmem.learner.config.LearnerConfig`, :class:`rlmem.learner.loss.LossConfig` and the
run-config checks (:mod:`rlmem.run.config.checks`) all call it, so a broken setting gets the same
message, naming the run-config fields, wherever it is caught first.
"""

from __future__ import annotations

import math


def clip_problems(clip_eps: float | None, clip_eps_high: float | None, *, mini_batches: int = 1,
                  ppo_epochs: int = 1, max_staleness: int = 0) -> list[tuple[str, str]]:
    """``(run-config key, message)`` for each broken part of the clip settings.

    Reusing a batch (``mini_batches > 1`` or ``ppo_epochs > 1``) makes every update after the first
    off-policy, so it needs the PPO clip (``clip_eps``); the unclipped loss is only valid on-policy.
    So do stale rollouts (``trainer.max_staleness > 0``, docs/design.md section 5): they were sampled
    by older weights than the ones they train.
    ``clip_eps_high`` (DAPO's clip-higher) widens the upper side of that clip, so it needs
    ``clip_eps`` and is at least as large.
    """
    out = []
    for name, v in (("clip_eps", clip_eps), ("clip_eps_high", clip_eps_high)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            out.append((f"algorithm.{name}", f"must be > 0 or null (got {v!r})"))
    if (mini_batches > 1 or ppo_epochs > 1) and clip_eps is None:
        out.append(("algorithm.clip_eps", f"must be set (e.g. 0.2) when a batch is reused (algorithm.mini_batches "
                                          f"{mini_batches}, algorithm.ppo_epochs {ppo_epochs}); the unclipped loss "
                                          "is only valid on-policy"))
    elif max_staleness > 0 and clip_eps is None:
        out.append(("algorithm.clip_eps", f"must be set (e.g. 0.2) when trainer.max_staleness is {max_staleness}: "
                                          "stale rollouts are off-policy and need the clipped surrogate"))
    if clip_eps_high is not None and not out:
        if clip_eps is None:
            out.append(("algorithm.clip_eps_high", "needs algorithm.clip_eps (it widens the upper side of that clip)"))
        elif clip_eps_high < clip_eps:
            out.append(("algorithm.clip_eps_high", f"({clip_eps_high}) must be >= algorithm.clip_eps ({clip_eps})"))
    return out


def raise_clip_problems(*args, **kwargs) -> None:
    """:func:`clip_problems` as a ValueError ``"<key>: <message>"`` (the first problem)."""
    problems = clip_problems(*args, **kwargs)
    if problems:
        key, msg = problems[0]
        raise ValueError(f"{key}: {msg}")

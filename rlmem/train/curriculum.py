"""Which eviction settings each group of a step trains at: stages, curriculum staircase, interoception.

All are pure functions of ``(config, seed, step)``, so a resumed run reproduces them exactly from
the step number alone (no state to checkpoint beyond the step).

Stages (``eviction.stages``): piecewise-constant ε and τ from a given training step on, so that a
recipe of several phases (the toy reproduction's ε 0.25, then ε 0.5 at τ 0.5, then τ 0.25) is one
config and one run instead of a chain of resumes with overrides. A stage's ε replaces
``eviction.eps``; the curriculum and interoception, which set ε themselves, cannot be combined
with a stage that sets ε (rlmem.run.config.checks).

Curriculum (docs/design.md "Extras"): retention rates ρ_0 ≥ … ≥ ρ_K, ``Δ`` steps per stage; during the
last fraction ``α`` of stage k the rate moves linearly from ρ_k to ρ_{k+1}, reaching it exactly at
the stage boundary; after K stages it stays at ρ_K. ε = 1 − ρ.

Interoception: one ε per group drawn uniformly from ``eps_choices`` (with the curriculum on too,
from those not above its current ε: the curriculum caps the rate); the tag
``<eviction_rate>{percent}%</eviction_rate>`` (rlmem.data.templates) is appended to its prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlmem.run.config import CurriculumConfig, EvictionSection, InteroceptionConfig


def stage_at(eviction: EvictionSection, step: int) -> dict[str, float]:
    """The ``eviction.stages`` values in force at training step ``step`` (1-based): ``{"eps": ..,
    "tau": ..}``, only the fields some stage up to ``step`` sets; the later stage wins."""
    out: dict[str, float] = {}
    for stage in eviction.stages:
        if step >= stage.from_step:
            out.update({k: float(v) for k, v in (("eps", stage.eps), ("tau", stage.tau)) if v is not None})
    return out


def retention_at(step: int, rates: Sequence[float], steps_per_stage: int, blend_fraction: float = 0.6) -> float:
    """ρ at ``step`` (0-based) of the staircase-with-blend."""
    if not rates:
        raise ValueError("retention_rates must not be empty")
    if steps_per_stage < 1:
        raise ValueError("steps_per_stage must be >= 1")
    if not 0.0 <= blend_fraction <= 1.0:
        raise ValueError("blend_fraction must be in [0, 1]")
    stage, within = divmod(max(0, int(step)), steps_per_stage)
    if stage >= len(rates) - 1:
        return float(rates[-1])
    lo, hi = float(rates[stage]), float(rates[stage + 1])
    blend_start = (1.0 - blend_fraction) * steps_per_stage
    if blend_fraction == 0.0 or within < blend_start:
        return lo
    frac = (within - blend_start) / (blend_fraction * steps_per_stage)
    return lo + frac * (hi - lo)


def curriculum_eps(step: int, cfg: CurriculumConfig) -> float:
    """ε = 1 − ρ at ``step``, rounded to 1e-9 so that ρ = 0.75 gives exactly ε = 0.25."""
    rho = retention_at(step, cfg.retention_rates, cfg.steps_per_stage, cfg.blend_fraction)
    return min(1.0, max(0.0, round(1.0 - rho, 9)))


def interoception_eps(choices: Sequence[float], num_groups: int, seed: int, step: int) -> list[float]:
    """One ε per group, uniform over ``choices``; deterministic in ``(seed, step)``."""
    if not choices:
        raise ValueError("eps_choices must not be empty")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), 0x1A7E])  # 0x1A7E: stream tag
    idx = rng.integers(0, len(choices), size=num_groups)
    return [float(choices[i]) for i in idx]


def group_eps(eviction: EvictionSection, num_groups: int, step: int, seed: int) -> list[float]:
    """The ε of each of the ``num_groups`` groups of ``step``: what the driver hands to rollouts.

    Interoception if enabled (its choices capped by the curriculum's current ε when both are
    enabled), else the curriculum if enabled, else the ε of the stage in force (``step`` is 0-based
    here: stage ``from_step`` counts from 1), else the fixed ``eviction.eps``.
    """
    intro: InteroceptionConfig = eviction.interoception
    if intro.enabled and eviction.curriculum.enabled:
        cap = curriculum_eps(step, eviction.curriculum)
        allowed = [e for e in intro.eps_choices if e <= cap + 1e-9] or [cap]
        return interoception_eps(allowed, num_groups, seed, step)
    if intro.enabled:
        return interoception_eps(intro.eps_choices, num_groups, seed, step)
    if eviction.curriculum.enabled:
        return [curriculum_eps(step, eviction.curriculum)] * num_groups
    return [float(stage_at(eviction, step + 1).get("eps", eviction.eps))] * num_groups

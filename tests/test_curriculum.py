"""Eviction stages, curriculum staircase with blend (hand values) and interoception ε per group."""

from __future__ import annotations

import pytest

from rlmem.run.config import CurriculumConfig, EvictionSection, EvictionStage, InteroceptionConfig
from rlmem.train.curriculum import (
    curriculum_eps, group_eps, interoception_eps, retention_at, stage_at,
)

RATES = [1.0, 0.5, 0.25]


def test_staircase_with_blend_hand_values():
    # Δ=10, α=0.6: flat for steps 0-3 of a stage, then linear over steps 4..10 to the next level.
    got = [retention_at(s, RATES, 10, 0.6) for s in range(0, 25)]
    want = [1.0, 1.0, 1.0, 1.0, 1.0, 1 - 0.5 / 6, 1 - 1.0 / 6, 0.75, 1 - 2.0 / 6, 1 - 2.5 / 6,
            0.5, 0.5, 0.5, 0.5, 0.5, 0.5 - 0.25 / 6, 0.5 - 0.5 / 6, 0.375, 0.5 - 1.0 / 6, 0.5 - 1.25 / 6,
            0.25, 0.25, 0.25, 0.25, 0.25]
    assert got == pytest.approx(want, abs=1e-12)
    assert retention_at(10_000, RATES, 10, 0.6) == 0.25


def test_staircase_without_blend_and_full_blend():
    assert [retention_at(s, [0.8, 0.4], 4, 0.0) for s in range(6)] == [0.8, 0.8, 0.8, 0.8, 0.4, 0.4]
    assert [retention_at(s, [0.8, 0.4], 4, 1.0) for s in range(5)] == pytest.approx([0.8, 0.7, 0.6, 0.5, 0.4])


def test_single_level_is_constant():
    assert {retention_at(s, [0.6], 3) for s in range(10)} == {0.6}


def test_curriculum_eps_is_one_minus_rho():
    cfg = CurriculumConfig(enabled=True, retention_rates=[1.0, 0.75], steps_per_stage=5, blend_fraction=0.6)
    got = [curriculum_eps(s, cfg) for s in (0, 1, 2, 3, 4, 5, 9)]
    assert got == pytest.approx([0.0, 0.0, 0.0, 1 / 12, 1 / 6, 0.25, 0.25], abs=1e-9)
    assert curriculum_eps(5, cfg) == 0.25  # exact, not 0.25000000000000006


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        retention_at(0, [], 10)
    with pytest.raises(ValueError):
        retention_at(0, [1.0], 0)


def test_interoception_is_seeded_and_covers_choices():
    a = interoception_eps([0.25, 0.5, 0.75], 64, seed=1, step=7)
    assert a == interoception_eps([0.25, 0.5, 0.75], 64, seed=1, step=7)
    assert a != interoception_eps([0.25, 0.5, 0.75], 64, seed=1, step=8)
    assert a != interoception_eps([0.25, 0.5, 0.75], 64, seed=2, step=7)
    assert set(a) == {0.25, 0.5, 0.75} and len(a) == 64


def test_group_eps_precedence():
    fixed = EvictionSection(delta=16, eps=0.3, block_size=4, window=4)
    assert group_eps(fixed, 3, step=100, seed=0) == [0.3, 0.3, 0.3]
    cur = fixed.model_copy(update={"curriculum": CurriculumConfig(enabled=True, retention_rates=[1.0, 0.5],
                                                                   steps_per_stage=2, blend_fraction=0.0)})
    assert group_eps(cur, 2, step=0, seed=0) == [0.0, 0.0] and group_eps(cur, 2, step=2, seed=0) == [0.5, 0.5]
    intro = fixed.model_copy(update={"interoception": InteroceptionConfig(enabled=True, eps_choices=[0.2, 0.8])})
    g = group_eps(intro, 16, step=3, seed=5)
    assert g == interoception_eps([0.2, 0.8], 16, 5, 3) and set(g) <= {0.2, 0.8}


def test_curriculum_caps_interoception():
    ev = EvictionSection(delta=16, eps=0.5, block_size=4, window=4,
                         curriculum=CurriculumConfig(enabled=True, retention_rates=[1.0, 0.75, 0.5], steps_per_stage=2,
                                                     blend_fraction=0.0),
                         interoception=InteroceptionConfig(enabled=True, eps_choices=[0.25, 0.5, 0.75]))
    assert group_eps(ev, 8, step=0, seed=3) == [0.0] * 8              # no choice <= 0: the curriculum's ε
    assert group_eps(ev, 8, step=2, seed=3) == [0.25] * 8             # only 0.25 <= 0.25
    late = group_eps(ev, 64, step=9, seed=3)                          # cap 0.5: 0.25 and 0.5, never 0.75
    assert late == interoception_eps([0.25, 0.5], 64, 3, 9) and set(late) == {0.25, 0.5}


def test_stages_switch_eps_and_tau_at_their_first_step_and_keep_unset_fields():
    """The toy recipe in one config: ε 0.25 (steps 1-60), then ε 0.5 at τ 0.5, then τ 0.25 from step 101."""
    ev = EvictionSection(delta=32, eps=0.25, block_size=4, window=16, tau=1.0,
                         stages=[EvictionStage(from_step=61, eps=0.5, tau=0.5), EvictionStage(from_step=101, tau=0.25)])
    assert stage_at(ev, 60) == {} and stage_at(ev, 61) == {"eps": 0.5, "tau": 0.5}
    assert stage_at(ev, 100) == {"eps": 0.5, "tau": 0.5} and stage_at(ev, 101) == {"eps": 0.5, "tau": 0.25}
    assert stage_at(ev, 10_000) == {"eps": 0.5, "tau": 0.25}
    # group_eps counts steps from 0 (steps done): training step 61 is step=60 there
    assert group_eps(ev, 2, step=59, seed=0) == [0.25, 0.25] and group_eps(ev, 2, step=60, seed=0) == [0.5, 0.5]
    assert group_eps(ev.model_copy(update={"stages": []}), 1, step=500, seed=0) == [0.25]

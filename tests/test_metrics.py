from __future__ import annotations

import math
from dataclasses import replace

import pytest

from rlmem.eviction.policy import EvictionConfig
from rlmem.metrics import pass_at_k, pass_at_k_summary, peak_kv_reduction, peak_no_eviction, schedule_peak


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 0, 1) == 0.0            # c = 0
    assert pass_at_k(5, 0, 5) == 0.0            # c = 0, n = k
    assert pass_at_k(5, 1, 5) == 1.0            # n = k: any correct sample -> 1
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)     # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 11/12
    assert pass_at_k(16, 1, 4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_k_summary():
    mean, se = pass_at_k_summary([0, 1, 2], 4, 1)   # per problem 0, .25, .5
    assert mean == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(((0.25) ** 2 + 0 + 0.25 ** 2) / 2 / 3))
    assert pass_at_k_summary([3], 3, 3) == (1.0, 0.0)
    assert pass_at_k_summary([0, 0], 4, 4) == (0.0, 0.0)


def test_peak_kv():
    assert peak_no_eviction(100, 50) == 149  # last token never fed
    assert peak_no_eviction(100, 50, count_last_token=True) == 150
    assert peak_kv_reduction([100, 10], [50, 91], [50, 25]) == pytest.approx((149 / 50 + 100 / 25) / 2)
    # NGC steady state just before a round is delta / eps
    paper = EvictionConfig(delta=256, eps=0.5, block_size=32, window=5)
    assert schedule_peak(100, 4000, paper) == 512
    assert schedule_peak(100, 4000, replace(paper, eps=0.75)) == pytest.approx(256 / 0.75, abs=32)
    # sequence ends before the first round: no eviction
    assert schedule_peak(10, 100, paper) == 109
    # prompt longer than delta: first round right after prefill
    assert schedule_peak(600, 1, paper) == 600
    with pytest.raises(ValueError):
        peak_kv_reduction([1], [1, 2], [1])


def test_peak_kv_entries_hand_values():
    from rlmem.metrics import peak_kv_entries

    assert peak_kv_entries(149, []) == 149                           # full cache: p + c - 1
    # rounds at 16 (16 -> 8 kept) and 24 (16 -> 8), 30 written: the peak is 16, before each round
    assert peak_kv_entries(30, [(16, 16, 8), (24, 16, 8)]) == 16
    # a long tail after the last round: 8 kept + (40 - 24) written since = 24
    assert peak_kv_entries(40, [(16, 16, 8), (24, 16, 8)]) == 24


@pytest.mark.parametrize("protect_recent", [0, 1])
def test_every_peak_is_the_one_rule(tiny_model_dir, protect_recent):
    """The torch engine's measured peak, the peak a record's rounds imply and (protect_recent >= 1,
    where it is exact) the schedule's prediction are the same number for every row of a batch."""
    from rlmem.engine.reference import from_pretrained
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.record import RolloutRecord, peak_kv

    engine = from_pretrained(str(tiny_model_dir), seed=3)
    cfg = EvictionConfig(delta=12, eps=0.6, block_size=4, window=4, protect_recent=protect_recent)
    prompts = [[5, 6, 7], list(range(3, 23)), [9] * 7]            # the second one is longer than delta
    records = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=40, seed=1), cfg)
    assert any(r.num_rounds >= 2 for r in records)
    for r in records:
        derived = RolloutRecord.from_dict({**r.to_dict(), "peak_kv": None})
        assert "peak_kv" not in derived.extra or derived.extra["peak_kv"] is None
        assert peak_kv(derived, engine.num_layers) == r.extra["peak_kv"]
        if protect_recent:
            assert schedule_peak(len(r.prompt_ids), len(r.completion_ids), cfg) == r.extra["peak_kv"]
        assert r.extra["peak_kv"] < len(r.prompt_ids) + len(r.completion_ids) - 1 or r.num_rounds == 0
    assert engine.last_stats.per_row_peak == [r.extra["peak_kv"] for r in records]

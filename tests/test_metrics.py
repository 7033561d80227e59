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

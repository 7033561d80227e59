"""The NGC policy: schedule, keep counts, blocks, Gumbel-top-k and the Plackett-Luce log-probability."""

import itertools
import math
from collections import Counter

import pytest
import torch

from rlmem.eviction.policy import (
    EvictionConfig, decide, first_round, is_round, keep_count, kept_key_slots, pad_orders, plackett_luce_logprob,
    round_times, sample_blocks, selection_logits,
)
from rlmem.eviction.scorers import ScoringInputs, get_scorer


def ngc_scores(q, k, valid, scaling):
    return get_scorer("ngc").scores(ScoringInputs(q, k, valid, torch.zeros_like(valid, dtype=torch.long), scaling))


def brute_force_pl(z: list[float], order: list[int]) -> float:
    """Probability of drawing ``order`` (without replacement, weights exp(z)) by direct product."""
    remaining = list(range(len(z)))
    p = 1.0
    for j in order:
        p *= math.exp(z[j]) / sum(math.exp(z[i]) for i in remaining)
        remaining.remove(j)
    return math.log(p)


def test_plackett_luce_matches_enumeration_and_sums_to_one():
    torch.manual_seed(0)
    z = torch.randn(5, dtype=torch.float64)
    for m in (1, 2, 3, 5):
        total = 0.0
        for order in itertools.permutations(range(5), m):
            lp = plackett_luce_logprob(z[None], torch.tensor([order])).item()
            assert lp == pytest.approx(brute_force_pl(z.tolist(), list(order)), abs=1e-12)
            total += math.exp(lp)
        assert total == pytest.approx(1.0, abs=1e-12)   # a distribution over ordered m-subsets


def test_plackett_luce_is_stable_for_extreme_logits():
    z = torch.tensor([[1000.0, -1000.0, 0.0, 999.0]], dtype=torch.float64)
    lp = plackett_luce_logprob(z, torch.tensor([[0, 3]]))
    assert torch.isfinite(lp).all()
    assert lp.item() == pytest.approx(-math.log1p(math.exp(-1)) + 0.0, abs=1e-9)


def test_plackett_luce_ignores_masked_blocks_and_padding():
    z = torch.tensor([[0.3, -0.2, 1.0, float("-inf")], [0.5, 0.1, float("-inf"), float("-inf")]], dtype=torch.float64)
    lp = plackett_luce_logprob(z, pad_orders([[2, 0], [1]]))
    assert lp[0].item() == pytest.approx(brute_force_pl([0.3, -0.2, 1.0], [2, 0]), abs=1e-12)
    assert lp[1].item() == pytest.approx(brute_force_pl([0.5, 0.1], [1]), abs=1e-12)


def test_gumbel_top_k_frequencies_match_plackett_luce():
    z = torch.tensor([1.0, 0.0, -0.5, 0.7], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    n = 20000
    counts = Counter(tuple(sample_blocks(z, 2, gen)) for _ in range(n))
    for order in itertools.permutations(range(4), 2):
        p = math.exp(brute_force_pl(z.tolist(), list(order)))
        # 5 standard errors of a binomial proportion
        assert counts[order] / n == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))


def test_greedy_is_plain_top_k_in_descending_order():
    z = torch.tensor([0.1, 2.0, -1.0, 1.5])
    assert sample_blocks(z, 3, greedy=True) == [1, 3, 0]


def test_schedule_round_times():
    cfg = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4)
    assert first_round(5, cfg) == 16 and first_round(40, cfg) == 40       # prompt longer than delta
    # rounds fire only before a token that is fed: t_r < n - 1
    assert round_times(5, 49, cfg) == [16, 32]
    assert round_times(5, 50, cfg) == [16, 32, 48]
    assert round_times(40, 60, cfg) == [40, 56] and is_round(56, 40, cfg) and not is_round(48, 40, cfg)
    assert round_times(5, 100, EvictionConfig(delta=16, eps=0.0, block_size=4, window=4)) == []


@pytest.mark.parametrize("n,eps,p,want", [(4, 0.5, 1, 2), (3, 0.5, 1, 2), (5, 0.9, 1, 1), (5, 0.9, 0, 1),
                                          (10, 0.7, 1, 3), (1, 0.5, 1, 1), (2, 1.0, 1, 1), (2, 1.0, 0, 0),
                                          (7, 0.25, 2, 5)])
def test_keep_count_round_half_up_and_clamp(n, eps, p, want):
    assert keep_count(n, eps, p) == want


def test_kept_slots_include_protected_newest_block():
    cfg = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4, protect_recent=1)
    # 10 alive keys -> blocks [0-3], [4-7], [8-9]; keep eligible block 0 and the protected short block 2
    assert kept_key_slots(10, [0], cfg) == [0, 1, 2, 3, 8, 9]


def test_key_scores_are_head_and_window_averaged_attention_with_gqa():
    torch.manual_seed(0)
    hq, hkv, w, d, c = 4, 2, 3, 8, 7
    q = torch.randn(1, hq, w, d, dtype=torch.float64)
    k = torch.randn(1, hkv, c, d, dtype=torch.float64)
    valid = torch.tensor([[True, True, False, True, True, True, False]])
    psi = ngc_scores(q, k, valid, 0.5)
    # reference: explicit loop over query heads; head h uses KV group h // (hq // hkv)
    ref = torch.zeros(c, dtype=torch.float64)
    idx = valid[0].nonzero().squeeze(-1)
    for h in range(hq):
        att = torch.softmax(q[0, h] @ k[0, h // 2, idx].T * 0.5, dim=-1)   # [w, alive]
        ref[idx] += att.mean(0) / hq
    assert torch.allclose(psi[0], ref, atol=1e-12)
    assert psi[0, ~valid[0]].abs().sum() == 0 and psi.sum().item() == pytest.approx(1.0)


def test_block_logits_mean_then_transform():
    psi = torch.tensor([[0.1, 0.3, 0.2, 0.0, 0.4]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False, True]])
    cfg = EvictionConfig(delta=8, eps=0.5, block_size=2, window=2, tau=0.5)
    unprotected = EvictionConfig(delta=8, eps=0.5, block_size=2, window=2, tau=0.5, protect_recent=0)
    z, n = selection_logits(psi, valid, [unprotected])
    assert n.tolist() == [2]                   # 4 alive keys -> two blocks (0.1, 0.3) and (0.2, 0.4)
    assert torch.allclose(z[0], torch.log(torch.tensor([0.2, 0.3], dtype=torch.float64)) / 0.5)
    lin = EvictionConfig(delta=8, eps=0.5, block_size=2, window=2, score_transform="linear", tau=0.5, protect_recent=0)
    z_lin, _ = selection_logits(psi, valid, [lin])
    assert torch.allclose(z_lin[0], torch.tensor([0.4, 0.6], dtype=torch.float64))
    z_prot, _ = selection_logits(psi, valid, [cfg])          # protect_recent=1: the newest block is not an action
    assert z_prot[0, 1] == float("-inf") and torch.allclose(z_prot[0, :1], z[0, :1])
    z_heur, _ = selection_logits(psi, valid, [cfg], learned=False)   # a heuristic's block means, untransformed
    assert torch.allclose(z_heur[0, :1], torch.tensor([0.2], dtype=torch.float64))


def test_decide_records_logprob_of_the_sampled_order():
    torch.manual_seed(0)
    cfg = EvictionConfig(delta=16, eps=0.5, block_size=2, window=2, protect_recent=1)
    q, k = torch.randn(2, 4, 2, 8, dtype=torch.float64), torch.randn(2, 2, 12, 8, dtype=torch.float64)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 9:] = False
    inputs = ScoringInputs(q, k, valid, torch.zeros(2, 12, dtype=torch.long), 0.3)
    decisions = decide(get_scorer("ngc"), inputs, [cfg, cfg], torch.Generator().manual_seed(0))
    z, n = selection_logits(ngc_scores(q, k, valid, 0.3), valid, [cfg, cfg])
    for i, d in enumerate(decisions):
        assert d.num_blocks == int(n[i])
        assert len(d.kept) == keep_count(d.num_blocks, 0.5, 1) - 1
        elig = z[i, : d.num_blocks - 1]
        assert d.logprob == pytest.approx(brute_force_pl(elig.tolist(), d.kept), abs=1e-10)
    assert decisions[1].keep_slots[-1] == 8   # row 1 has 9 alive keys; the newest (short) block is protected


@pytest.mark.parametrize("kwargs,field", [
    (dict(delta=4, window=8), "window"), (dict(delta=4, block_size=8, window=2), "block_size"),
    (dict(eps=1.5), "eps"), (dict(eps=-0.1), "eps"), (dict(score_transform="exp"), "score_transform"),
    (dict(tau=0.0), "tau"), (dict(protect_recent=-1), "protect_recent"), (dict(delta=0), "delta"),
    (dict(scorer="no-such-scorer"), "scorer"),
])
def test_bad_eviction_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EvictionConfig(**kwargs)

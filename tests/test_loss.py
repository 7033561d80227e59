"""Losses against hand computations (docs/design.md section 1, "Losses (Dr. GRPO)")."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rlmem.learner.loss import LossConfig, eviction_loss, group_advantages, ngc_loss, token_loss

PAD = -100.0  # padding values that would visibly corrupt a result if they leaked through a mask


def _tokens():
    # Two rollouts: 3 completion tokens with A=+1, 1 token with A=-2.
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, PAD, PAD]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    return lp, mask, adv


# ---------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_mean_only():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    a = group_advantages(r, 4)
    assert torch.allclose(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))


def test_group_advantages_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4, scale_by_std=True, eps=0.0 + 1e-12)
    # group 1: unbiased std sqrt(1/3); group 2: std 0.5; group 3: all equal -> 0 (not nan).
    s = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([s, -s, -s, s, 0.5, 0.5, 0.5, -1.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(a, expected, atol=1e-6)
    assert torch.isfinite(group_advantages(torch.ones(4), 4, scale_by_std=True)).all()


def test_group_advantages_bad_layout():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


# ---------------------------------------------------------------------------------------------
# Token loss aggregations


def test_token_loss_constant_is_dr_grpo():
    lp, mask, adv = _tokens()
    loss, _ = token_loss(lp, None, mask, adv, aggregation="constant", max_len=4)
    # −(1/G) Σ_i Σ_t logπ A_i / max_len = −((−6)(1) + (−0.5)(−2)) / (2·4) = 5/8
    assert loss.item() == pytest.approx(0.625, abs=1e-7)


def test_token_loss_token_mean_and_seq_mean():
    lp, mask, adv = _tokens()
    tm, _ = token_loss(lp, None, mask, adv, aggregation="token_mean")
    sm, _ = token_loss(lp, None, mask, adv, aggregation="seq_mean")
    assert tm.item() == pytest.approx(5 / 4, abs=1e-7)                      # −(−5)/4 tokens
    assert sm.item() == pytest.approx(-((-6 / 3) + (1.0 / 1)) / 2, abs=1e-7)  # 0.5


def test_constant_differs_from_token_mean_and_seq_mean():
    """OpenRLHF's 'dr_grpo' keeps a token mean; with unequal lengths that is a different loss."""
    lp, mask, adv = _tokens()
    c, _ = token_loss(lp, None, mask, adv, aggregation="constant", max_len=3)
    tm, _ = token_loss(lp, None, mask, adv, aggregation="token_mean")
    sm, _ = token_loss(lp, None, mask, adv, aggregation="seq_mean")
    assert c.item() == pytest.approx(5 / 6, abs=1e-7)
    assert abs(c.item() - tm.item()) > 0.1 and abs(c.item() - sm.item()) > 0.1
    # The constant normaliser does not depend on the completion lengths: adding a token of
    # log-prob 0 (probability 1) changes token_mean and seq_mean but not the Dr. GRPO loss.
    lp2 = lp.clone()
    lp2[1, 1] = 0.0
    mask2 = mask.clone()
    mask2[1, 1] = True
    c2, _ = token_loss(lp2, None, mask2, adv, aggregation="constant", max_len=3)
    tm2, _ = token_loss(lp2, None, mask2, adv, aggregation="token_mean")
    assert c2.item() == pytest.approx(c.item(), abs=1e-7)
    assert tm2.item() == pytest.approx(5 / 5, abs=1e-7)


def test_token_loss_global_denominators():
    lp, mask, adv = _tokens()
    c, _ = token_loss(lp, None, mask, adv, aggregation="constant", max_len=4, num_sequences=8)
    t, _ = token_loss(lp, None, mask, adv, aggregation="token_mean", num_tokens=10)
    s, _ = token_loss(lp, None, mask, adv, aggregation="seq_mean", num_sequences=4)
    assert c.item() == pytest.approx(5 / 32, abs=1e-7)
    assert t.item() == pytest.approx(5 / 10, abs=1e-7)
    assert s.item() == pytest.approx(1 / 4, abs=1e-7)


def test_constant_needs_max_len():
    lp, mask, adv = _tokens()
    with pytest.raises(ValueError, match="max_len"):
        token_loss(lp, None, mask, adv, aggregation="constant")
    with pytest.raises(ValueError, match="max_len"):
        LossConfig(aggregation="constant")
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="mean", max_len=4)


def test_unclipped_gradient_is_policy_gradient():
    """∇loss = −Σ_i A_i Σ_t ∇logπ(o_{i,t}) / (G·max_len), through a real log-softmax."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)

    def logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)

    loss, _ = token_loss(logp(), None, mask, adv, aggregation="constant", max_len=6)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = torch.zeros_like(logits)
    for i in range(3):
        for t in range(5):
            if mask[i, t]:
                (gi,) = torch.autograd.grad(logp()[i, t], logits)
                expected -= adv[i] * gi / (3 * 6)
    assert torch.allclose(grad, expected, atol=1e-12)
    # With clipping at ratio 1 (old = current) the gradient is the same.
    lp = logp()
    loss_c, stats = token_loss(lp, lp.detach(), mask, adv, aggregation="constant", max_len=6, clip_eps=0.2)
    (grad_c,) = torch.autograd.grad(loss_c, logits)
    assert torch.allclose(grad_c, expected, atol=1e-12)
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Clipping


def _clip_case(ratio: float, adv: float, clip_eps=0.2, clip_eps_high=None):
    lp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - math.log(ratio)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = token_loss(lp, old, mask, torch.tensor([adv], dtype=torch.float64), aggregation="token_mean",
                             clip_eps=clip_eps, clip_eps_high=clip_eps_high)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g.item(), stats


def test_clipping_zero_gradient_on_clipped_side():
    # ratio above 1+ε with A>0: clipped, no gradient; loss is −(1+ε)A.
    loss, g, st = _clip_case(1.5, 2.0)
    assert g == 0.0 and loss == pytest.approx(-1.2 * 2.0) and st["clip_frac"] == 1.0
    assert st["clip_frac_high"] == 1.0 and st["clip_frac_low"] == 0.0
    # ratio below 1−ε with A<0: clipped, no gradient.
    loss, g, st = _clip_case(0.5, -2.0)
    assert g == 0.0 and loss == pytest.approx(0.8 * 2.0) and st["clip_frac_low"] == 1.0
    # Outside the range but on the unclipped side: gradient −A·ρ (d ρ / d logπ = ρ).
    _, g, st = _clip_case(1.5, -2.0)
    assert g == pytest.approx(2.0 * 1.5) and st["clip_frac"] == 0.0
    _, g, st = _clip_case(0.5, 2.0)
    assert g == pytest.approx(-2.0 * 0.5) and st["clip_frac"] == 0.0


def test_asymmetric_clip():
    _, g, _ = _clip_case(1.25, 1.0, clip_eps=0.2, clip_eps_high=0.28)
    assert g == pytest.approx(-1.25)              # inside [0.8, 1.28]
    _, g, st = _clip_case(1.3, 1.0, clip_eps=0.2, clip_eps_high=0.28)
    assert g == 0.0 and st["clip_frac"] == 1.0
    _, g, _ = _clip_case(0.75, -1.0, clip_eps=0.2, clip_eps_high=0.28)
    assert g == 0.0                                # low side still 0.2


# ---------------------------------------------------------------------------------------------
# Eviction loss


def _evictions():
    # [B=3, R=2, L=2]; rollout 0 has 2 rounds, rollout 1 one, rollout 2 none.
    lp = torch.tensor([[[-1.0, -2.0], [-3.0, -4.0]],
                       [[-0.5, -1.5], [PAD, PAD]],
                       [[PAD, PAD], [PAD, PAD]]])
    rmask = torch.tensor([[True, True], [True, False], [False, False]])
    adv = torch.tensor([1.0, -1.0, 2.0])
    return lp, rmask, adv


def test_eviction_loss_hand():
    lp, rmask, adv = _evictions()
    loss, stats = eviction_loss(lp, None, rmask, adv)
    # rollout 0: layer means (−1−3)/2 = −2 and (−2−4)/2 = −3, × A=1 -> −5
    # rollout 1: layer means −0.5 and −1.5, × A=−1 -> +2
    # rollout 2: no rounds -> 0, but counts in the average over 3 rollouts.
    assert loss.item() == pytest.approx(-(-5.0 + 2.0) / 3, abs=1e-7)
    assert stats["count"] == 6
    loss_g, _ = eviction_loss(lp, None, rmask, adv, num_sequences=6)
    assert loss_g.item() == pytest.approx(0.5, abs=1e-7)


def test_eviction_loss_gradient_and_clip():
    lp, rmask, adv = _evictions()
    lp = lp.clone().requires_grad_(True)
    loss, _ = eviction_loss(lp, None, rmask, adv)
    (g,) = torch.autograd.grad(loss, lp)
    expected = torch.tensor([[[-0.5, -0.5], [-0.5, -0.5]], [[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]) / 3
    assert torch.allclose(g, expected)
    # Rollout 0 round 0 moved to ratio e^0.5 > 1.2 with A>0: clipped, its gradient vanishes.
    old = lp.detach().clone()
    old[0, 0, :] -= 0.5
    loss_c, st = eviction_loss(lp, old, rmask, adv, clip_eps=0.2)
    (gc,) = torch.autograd.grad(loss_c, lp)
    exp_c = expected.clone()
    exp_c[0, 0, :] = 0.0
    assert torch.allclose(gc, exp_c)
    assert st["clip_frac"] == pytest.approx(2 / 6)


def test_ngc_loss_total():
    lp, mask, adv2 = _tokens()
    elp, rmask, _ = _evictions()
    adv = torch.tensor([1.0, -2.0])
    cfg = LossConfig(aggregation="constant", max_len=4, mem_coef=0.5)
    total, stats = ngc_loss(lp, None, mask, elp[:2], None, rmask[:2], adv, cfg)
    # token 0.625; eviction: rollout 0 −5·1, rollout 1 (−0.5−1.5)·(−2) = 4 -> −(−1)/2 = 0.5
    assert stats["loss/token"] == pytest.approx(0.625)
    assert stats["loss/eviction"] == pytest.approx(0.5)
    assert total.item() == pytest.approx(0.625 + 0.5 * 0.5)
    total0, stats0 = ngc_loss(lp, None, mask, None, None, None, adv, cfg)
    assert total0.item() == pytest.approx(0.625) and stats0["loss/eviction"] == 0.0
    # the paper's "token loss alone" ablation: mem_coef = 0 with evictions present trains no eviction
    e = elp[:2].detach().clone().requires_grad_(True)
    total_t, stats_t = ngc_loss(lp, None, mask, e, None, rmask[:2], adv, replace(cfg, mem_coef=0.0))
    assert total_t.item() == pytest.approx(0.625) and stats_t["loss/eviction"] == 0.0
    assert total_t.grad_fn is None or torch.autograd.grad(total_t, e, allow_unused=True)[0] is None


# ---------------------------------------------------------------------------------------------
# Micro-batches add up to the full batch


@pytest.mark.parametrize("aggregation", ["constant", "token_mean", "seq_mean"])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("tis", [None, "token", "sequence"])
def test_microbatches_sum_to_full_batch(aggregation, clip, tis):
    g = torch.Generator().manual_seed(1)
    b, t, r, l = 5, 6, 3, 2
    w = torch.randn(b, t, generator=g, dtype=torch.float64, requires_grad=True)
    we = torch.randn(b, r, l, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 4, 0, 3])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    rmask = torch.arange(r)[None, :] < torch.tensor([3, 0, 1, 0, 2])[:, None]
    adv = torch.tensor([0.5, -1.0, 0.25, 1.0, -0.75], dtype=torch.float64)
    old_t = (-torch.rand(b, t, generator=g, dtype=torch.float64)) if clip else None
    old_e = (-torch.rand(b, r, l, generator=g, dtype=torch.float64) * 3) if clip else None
    if tis:   # engine log-probs (the records') and start-of-step ones (π_prox), both off the graph
        old_t = -torch.rand(b, t, generator=g, dtype=torch.float64)
        old_e = -torch.rand(b, r, l, generator=g, dtype=torch.float64) * 3
        prox_t = old_t + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
        prox_e = old_e + 0.5 * torch.randn(b, r, l, generator=g, dtype=torch.float64)
    cfg = LossConfig(aggregation=aggregation, max_len=8, mem_coef=0.7, clip_eps=clip, tis=tis, tis_cap=1.5)

    def loss_of(idx, **kw):
        lp = -torch.nn.functional.softplus(w[idx])      # log-probs < 0, on the graph
        elp = -torch.nn.functional.softplus(we[idx]) * 3
        if tis:
            kw.update(prox_token_logprobs=prox_t[idx], prox_eviction_logprobs=prox_e[idx])
        return ngc_loss(lp, None if old_t is None else old_t[idx], mask[idx], elp,
                        None if old_e is None else old_e[idx], rmask[idx], adv[idx], cfg, **kw)[0]

    full = loss_of(torch.arange(b))
    gw, gwe = torch.autograd.grad(full, (w, we))
    n_tok = int(mask.sum())
    parts = [loss_of(torch.tensor(ix), num_sequences=b, num_tokens=n_tok) for ix in ([0, 1], [2], [3, 4])]
    total = sum(parts)
    pw, pwe = torch.autograd.grad(total, (w, we))
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(pw, gw, atol=1e-14) and torch.allclose(pwe, gwe, atol=1e-14)
    assert gw.abs().sum() > 0 and gwe.abs().sum() > 0
    # Without the global denominators the parts do not add up (except by accident).
    naive = sum(loss_of(torch.tensor(ix)) for ix in ([0, 1], [2], [3, 4]))
    assert abs(naive.item() - full.item()) > 1e-3


def test_kl_penalty_is_k3_aggregated_like_the_token_loss():
    """KL(π_θ‖π_ref) per token = exp(r) − r − 1 with r = ref − logp, summed over valid tokens and
    divided by S·max_len (Dr. GRPO), computed here element by element; zero where the policies agree."""
    from rlmem.learner.loss import kl_penalty

    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -0.1], [-0.3, -1.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    want = 0.0
    for i in range(2):
        for t in range(3):
            if mask[i, t]:
                r = float(ref[i, t] - lp[i, t])
                want += math.exp(r) - r - 1
    kl, st = kl_penalty(lp, ref, mask, aggregation="constant", max_len=10, num_sequences=4)
    assert kl.item() == pytest.approx(want / (4 * 10), rel=1e-12)
    assert st["count"] == 4 and st["kl_ref_mean"] == pytest.approx(want / 4, rel=1e-12)
    kl.backward()
    # d/dlogp (exp(r) − r − 1) = 1 − exp(r): a descent step moves logp toward ref (down at [0, 0]
    # where ref is lower, up at [0, 2] where it is higher); equal or masked tokens get no gradient
    assert lp.grad[0, 2] < 0 < lp.grad[0, 0] and lp.grad[0, 1] == 0 and (lp.grad[1, 1:] == 0).all()
    same, _ = kl_penalty(ref, ref, mask, aggregation="token_mean")
    assert same.item() == 0.0
    with pytest.raises(ValueError, match="shapes"):
        kl_penalty(lp, ref[:, :2], mask)


def test_ngc_loss_adds_kl_coef_times_the_penalty_and_needs_the_reference():
    from rlmem.learner.loss import LossConfig, kl_penalty, ngc_loss

    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    ref = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    ev = -torch.rand(4, 2, 3, generator=g, dtype=torch.float64)
    mask, rmask = torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 2, dtype=torch.bool)
    adv = torch.tensor([0.5, -0.5, 0.25, -0.25], dtype=torch.float64)
    base, _ = ngc_loss(lp, None, mask, ev, None, rmask, adv, LossConfig(max_len=5))
    with_kl, st = ngc_loss(lp, None, mask, ev, None, rmask, adv, LossConfig(max_len=5, kl_coef=0.3),
                           ref_token_logprobs=ref)
    kl, _ = kl_penalty(lp, ref, mask, max_len=5)
    assert with_kl.item() == pytest.approx(base.item() + 0.3 * kl.item(), rel=1e-12)
    assert st["loss/kl"] == pytest.approx(kl.item()) and st["token/kl_ref_mean"] > 0
    with pytest.raises(ValueError, match="reference model"):
        ngc_loss(lp, None, mask, ev, None, rmask, adv, LossConfig(max_len=5, kl_coef=0.3))
    with pytest.raises(ValueError, match="kl_coef"):
        LossConfig(max_len=5, kl_coef=-1.0)


# ---------------------------------------------------------------------------------------------
# Truncated importance sampling (docs/design.md section 5, "The objective for stale rollouts")

# Two rollouts of 3 and 2 tokens: current log-probs, the proximal (start-of-step) ones and the
# engine's (recorded, possibly stale); the padding slot holds values that would show if they leaked.
_TIS_LP = [[-1.0, -2.0, -0.5], [-0.7, -1.2, PAD]]
_TIS_PROX = [[-1.1, -1.5, -0.5], [-0.6, -1.4, PAD]]
_TIS_ENG = [[-1.3, -1.2, -1.6], [-0.4, -1.0, -PAD]]
_TIS_MASK = [[True, True, True], [True, True, False]]
_TIS_ADV = [1.5, -0.5]


def _hand_tis(mode: str, cap: float, clip_eps: float | None) -> tuple[float, list[float], int]:
    """Token loss (constant aggregation, S = 2, max_len = 4), per-token weights and #truncated, by hand."""
    weights, total, truncated = [], 0.0, 0
    for i in range(2):
        valid = [t for t in range(3) if _TIS_MASK[i][t]]
        seq_log_w = sum(_TIS_PROX[i][t] - _TIS_ENG[i][t] for t in valid)
        for t in valid:
            log_w = (_TIS_PROX[i][t] - _TIS_ENG[i][t]) if mode == "token" else seq_log_w
            w = min(math.exp(log_w), cap)
            truncated += math.exp(log_w) > cap
            weights.append(w)
            a = _TIS_ADV[i]
            rho = math.exp(_TIS_LP[i][t] - _TIS_PROX[i][t])
            if clip_eps is None:
                term = w * a * _TIS_LP[i][t]
            else:
                term = w * min(rho * a, min(max(rho, 1 - clip_eps), 1 + clip_eps) * a)
            total += term
    return -total / (2 * 4), weights, truncated


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_tis_token_loss_and_stats_by_hand(mode, clip_eps):
    lp = torch.tensor(_TIS_LP, dtype=torch.float64)
    prox, eng = torch.tensor(_TIS_PROX, dtype=torch.float64), torch.tensor(_TIS_ENG, dtype=torch.float64)
    mask, adv = torch.tensor(_TIS_MASK), torch.tensor(_TIS_ADV, dtype=torch.float64)
    cap = 1.3
    loss, st = token_loss(lp, eng, mask, adv, aggregation="constant", max_len=4, clip_eps=clip_eps,
                          prox_logprobs=prox, tis=mode, tis_cap=cap)
    want, weights, truncated = _hand_tis(mode, cap, clip_eps)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert st["tis_weight_mean"] == pytest.approx(sum(weights) / 5, rel=1e-12)
    assert st["tis_weight_min"] == pytest.approx(min(weights)) and st["tis_weight_max"] == pytest.approx(max(weights))
    assert st["tis_clip_frac"] == truncated / 5
    assert 0 < truncated < 5                                   # the cap bites, but not everywhere
    k3 = [math.exp(p - e) - 1 - (p - e) for pr, er, mr in zip(_TIS_PROX, _TIS_ENG, _TIS_MASK)
          for p, e, m in zip(pr, er, mr) if m]
    assert st["engine_mismatch_kl"] == pytest.approx(sum(k3) / 5, rel=1e-12)
    # the ratio is taken against π_prox, not against the engine's log-probs
    ratios = [math.exp(a - b) for ar, br, mr in zip(_TIS_LP, _TIS_PROX, _TIS_MASK) for a, b, m in zip(ar, br, mr) if m]
    assert st["ratio_mean"] == pytest.approx(sum(ratios) / 5) and st["ratio_max"] == pytest.approx(max(ratios))


def test_tis_sequence_weights_are_one_per_rollout():
    from rlmem.learner.loss import tis_weights

    prox, eng = torch.tensor(_TIS_PROX), torch.tensor(_TIS_ENG)
    w, trunc = tis_weights(prox, eng, torch.tensor(_TIS_MASK), "sequence", 1.3)
    # rollout 0: Σ(prox − eng) = 0.2 − 0.3 + 1.1 = 1.0 -> e^1 > 1.3, truncated; rollout 1: −0.2 − 0.4 = −0.6
    assert torch.allclose(w, torch.tensor([[1.3, 1.3, 1.3], [math.exp(-0.6), math.exp(-0.6), 0.0]]))
    assert trunc.tolist() == [[True, True, True], [False, False, False]]
    # a huge log-ratio is capped without overflowing
    w_big, _ = tis_weights(torch.tensor([[500.0]]), torch.tensor([[-500.0]]), torch.ones(1, 1, dtype=torch.bool),
                           "token", 2.0)
    assert w_big.item() == pytest.approx(2.0)


def test_tis_gradient_at_the_start_of_the_step_is_the_truncated_is_policy_gradient():
    """One update per batch: π_prox = π_θ (detached), ρ = 1 and ∇loss = −w·A·∇logπ / (S·max_len)."""
    lp = torch.tensor(_TIS_LP, dtype=torch.float64, requires_grad=True)
    eng, mask = torch.tensor(_TIS_ENG, dtype=torch.float64), torch.tensor(_TIS_MASK)
    adv = torch.tensor(_TIS_ADV, dtype=torch.float64)
    for clip_eps in (0.2, None):
        loss, st = token_loss(lp, eng, mask, adv, aggregation="constant", max_len=4, clip_eps=clip_eps,
                              prox_logprobs=lp.detach(), tis="token", tis_cap=2.0)
        (g,) = torch.autograd.grad(loss, lp)
        w = torch.clamp(torch.exp(lp.detach() - eng), max=2.0)
        want = torch.where(mask, -w * adv[:, None] / 8, torch.zeros_like(w))
        assert torch.allclose(g, want, atol=1e-14)
        assert st["ratio_mean"] == 1.0 and st["ratio_min"] == 1.0 and st.get("clip_frac", 0.0) == 0.0


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_tis_eviction_loss_by_hand(mode):
    """Per eviction action (round, layer), or one weight per rollout over all its eviction actions."""
    lp, rmask, adv = _evictions()
    g = torch.Generator().manual_seed(3)
    eng = torch.where(rmask[:, :, None], lp + 0.6 * torch.randn(lp.shape, generator=g), torch.full_like(lp, PAD))
    prox = torch.where(rmask[:, :, None], lp + 0.1 * torch.randn(lp.shape, generator=g), torch.full_like(lp, -PAD))
    cap = 1.5
    loss, st = eviction_loss(lp, eng, rmask, adv, clip_eps=0.2, prox_logprobs=prox, tis=mode, tis_cap=cap)
    total, weights, truncated = 0.0, [], 0
    for i in range(3):
        rounds = [r for r in range(2) if rmask[i, r]]
        seq = sum(float(prox[i, r, l] - eng[i, r, l]) for r in rounds for l in range(2))
        for l in range(2):
            acc = 0.0
            for r in rounds:
                log_w = float(prox[i, r, l] - eng[i, r, l]) if mode == "token" else seq
                w = min(math.exp(log_w), cap)
                truncated += math.exp(log_w) > cap
                weights.append(w)
                rho = math.exp(float(lp[i, r, l] - prox[i, r, l]))
                a = float(adv[i])
                acc += w * min(rho * a, min(max(rho, 0.8), 1.2) * a)
            total += acc / max(len(rounds), 1)
    assert loss.item() == pytest.approx(-total / 3, rel=1e-6)
    assert st["count"] == 6 and st["tis_weight_mean"] == pytest.approx(sum(weights) / 6, rel=1e-6)
    assert st["tis_weight_max"] == pytest.approx(max(weights), rel=1e-6)
    assert st["tis_clip_frac"] == truncated / 6 and 0 < truncated


def test_tis_with_a_matching_engine_is_todays_loss_exactly():
    """π_prox = π_engine: every weight is 1 and the loss and gradients are bit-identical to tis off."""
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(3, 4, generator=g, requires_grad=True)
    we = torch.randn(3, 2, 2, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    rmask = torch.tensor([[True, True], [True, False], [False, False]])
    old_t, old_e = -torch.rand(3, 4, generator=g), -torch.rand(3, 2, 2, generator=g) * 2
    adv = torch.tensor([0.5, -1.0, 0.25])
    runs = []
    for tis in (None, "token", "sequence"):
        lp, elp = -torch.nn.functional.softplus(w0), -torch.nn.functional.softplus(we) * 2
        cfg = LossConfig(max_len=4, clip_eps=0.2, tis=tis)
        loss, st = ngc_loss(lp, old_t, mask, elp, old_e, rmask, adv, cfg,
                            prox_token_logprobs=old_t if tis else None, prox_eviction_logprobs=old_e if tis else None)
        runs.append((loss, torch.autograd.grad(loss, (w0, we)), st))
    (l0, g0, s0), rest = runs[0], runs[1:]
    assert "token/tis_weight_mean" not in s0 and "eviction/tis_clip_frac" not in s0
    for loss, grads, st in rest:
        assert torch.equal(loss, l0) and all(torch.equal(a, b) for a, b in zip(grads, g0))
        assert st["token/tis_weight_mean"] == 1.0 and st["eviction/tis_clip_frac"] == 0.0
        assert st["token/engine_mismatch_kl"] == 0.0


def test_tis_config_and_missing_proximal_logprobs():
    with pytest.raises(ValueError, match=r"^algorithm\.tis: must be token, sequence or null"):
        LossConfig(max_len=4, tis="off")
    with pytest.raises(ValueError, match=r"^algorithm\.tis_cap: must be a finite number > 0"):
        LossConfig(max_len=4, tis="token", tis_cap=0.0)
    lp, mask, adv = _tokens()
    with pytest.raises(ValueError, match="algorithm.tis needs the proximal"):
        ngc_loss(lp, lp, mask, None, None, None, adv, LossConfig(max_len=4, tis="token"))

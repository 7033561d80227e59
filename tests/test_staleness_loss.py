"""The learner on stale records (docs/design.md section 5, "The objective for stale rollouts").

Records are sampled by the tiny model with the real torch engine; the learner then takes steps so
its weights move, and trains on the same, now stale, records. Every statistic it reports is checked
against a hand computation from an independent replay: the learner's current weights loaded into a
fresh HF model, replayed with :func:`rlmem.learner.replay.replay_forward`.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlmem.engine.reference import ReferenceEngine
from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig
from rlmem.learner.learner import Learner, LearnerConfig
from rlmem.learner.loss import group_advantages
from rlmem.learner.replay import replay_forward, rollout_logprobs
from rlmem.ports import free_port

MAX_NEW = 24
EVICTION = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4)
CLIP = 0.2


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """8 rollouts (2 prompts x 4) of the tiny model in fp32, and their Dr. GRPO advantages."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [tok("Solve 12+7.").input_ids] * 4 + [tok("abc").input_ids] * 4
    records = ReferenceEngine(model, tok, seed=0).generate(
        prompts, SamplingParams(temperature=0.9, max_new_tokens=MAX_NEW), EVICTION)
    assert sum(r.num_rounds > 0 for r in records) >= 6
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 4).tolist()
    return records, adv


def make_learner(model_dir, **kw) -> Learner:
    cfg = dict(model_path=str(model_dir), dtype="float32", zero_stage=2, max_len=MAX_NEW, lr=1e-3,
               micro_batch_size=4, clip_eps=CLIP, grad_clip=None)
    cfg.update(kw)
    return Learner(LearnerConfig(**cfg), master_port=free_port())


def replay_under(model_dir, state: dict[str, torch.Tensor] | None, records):
    """Independent replay: (token log-probs [B, T], mask, eviction log-probs [B, R, L], round mask)
    under the tiny model's weights, or ``state`` loaded into a fresh copy of it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = replay_forward(model, records)
    return out.token_logprobs, out.token_mask, out.eviction_logprobs, out.round_mask


def moved_learner(model_dir, records, adv, steps: int = 2, **kw):
    """A learner after ``steps`` updates on ``records`` (so they are ``steps`` updates stale), its
    weights, and the first step's metrics (on-policy)."""
    learner = make_learner(model_dir, **kw)
    first = learner.train_step(records, adv, global_num_sequences=len(records))
    for _ in range(steps - 1):
        learner.train_step(records, adv, global_num_sequences=len(records))
    state = {n: t.clone() for n, t in learner.named_parameters_for_sync()}
    return learner, state, first


def hand_ratio_stats(now: torch.Tensor, old: torch.Tensor, valid: torch.Tensor, adv: torch.Tensor) -> dict:
    """Ratio and clip statistics by hand: ρ = exp(replay − recorded) over the valid actions, the
    clipped branch active where A > 0 and ρ > 1 + ε, or A < 0 and ρ < 1 − ε."""
    ratios, high, low = [], 0, 0
    for idx in valid.nonzero().tolist():
        rho = math.exp(float(now[tuple(idx)]) - float(old[tuple(idx)]))
        a = float(adv[idx[0]])
        ratios.append(rho)
        high += a > 0 and rho > 1 + CLIP
        low += a < 0 and rho < 1 - CLIP
    n = len(ratios)
    return {"ratio_mean": sum(ratios) / n, "ratio_min": min(ratios), "ratio_max": max(ratios),
            "clip_frac": (high + low) / n, "clip_frac_high": high / n, "clip_frac_low": low / n, "n": n}


def test_stale_records_ratios_and_clip_fractions_equal_a_hand_computation(tiny_model_dir, batch):
    records, adv = batch
    rec = rollout_logprobs(records, 2)
    # the records are exact under the weights that sampled them (existing parity, asserted here again)
    tok0, mask, ev0, rmask = replay_under(tiny_model_dir, None, records)
    diff_tok = float((tok0 - rec.token_logprobs).abs()[mask].max())
    diff_ev = float((ev0 - rec.eviction_logprobs).abs()[rmask[:, :, None].expand_as(ev0)].max())
    assert diff_tok <= 1e-4 and diff_ev <= 1e-4, (diff_tok, diff_ev)

    learner, state, first = moved_learner(tiny_model_dir, records, adv)
    assert first["replay/max_abs_logprob_diff"] <= 1e-4 and first["replay/max_abs_eviction_logprob_diff"] <= 1e-4
    assert first["token/ratio_mean"] == pytest.approx(1.0, abs=1e-4)

    tok, _, ev, _ = replay_under(tiny_model_dir, state, records)   # π_θ now, independently
    a = torch.tensor(adv)
    want_tok = hand_ratio_stats(tok, rec.token_logprobs, mask, a)
    want_ev = hand_ratio_stats(ev, rec.eviction_logprobs, rmask[:, :, None].expand_as(ev), a)
    m = learner.train_step(records, adv, global_num_sequences=len(records))   # trains on stale records

    # the weights really moved: some ratios leave the clip range on both kinds of action, not all do
    assert 0 < want_tok["clip_frac_low"] and 0 < want_tok["clip_frac_high"] and want_tok["clip_frac"] < 1
    assert 0 < want_ev["clip_frac"] < 1 and want_ev["ratio_max"] > 1 + CLIP
    assert m["replay/max_abs_logprob_diff"] > 0.1
    for kind, want in (("token", want_tok), ("eviction", want_ev)):
        assert m[f"{kind}/actions"] == want["n"]
        for k in ("ratio_mean", "ratio_min", "ratio_max"):
            assert m[f"{kind}/{k}"] == pytest.approx(want[k], rel=2e-5), (kind, k)
        for k in ("clip_frac", "clip_frac_high", "clip_frac_low"):
            assert m[f"{kind}/{k}"] == pytest.approx(want[k], abs=1e-9), (kind, k)
        assert not any(k.startswith(f"{kind}/tis") for k in m)   # TIS off: no weight statistics
    print(f"\nstale ratios: token {want_tok}\neviction {want_ev}\nreplay diffs at the sampling weights: "
          f"token {diff_tok:.2e}, eviction {diff_ev:.2e}")

    # the loss on the stale records, by hand: −(1/S) Σ min(ρA, clip(ρ)A) / max_len for the tokens,
    # −(1/S) Σ_i Σ_l mean_r min(ρA, clip(ρ)A) for the evictions
    def term(lp_now, lp_old, i):
        rho = math.exp(float(lp_now) - float(lp_old))
        return min(rho * adv[i], min(max(rho, 1 - CLIP), 1 + CLIP) * adv[i])

    s = len(records)
    tok_loss = -sum(term(tok[i, t], rec.token_logprobs[i, t], i) for i, t in mask.nonzero().tolist()) / (s * MAX_NEW)
    ev_loss = 0.0
    for i in range(s):
        rounds = int(rmask[i].sum())
        for l in range(2):
            if rounds:
                ev_loss -= sum(term(ev[i, r, l], rec.eviction_logprobs[i, r, l], i) for r in range(rounds)) / rounds / s
    assert m["loss/token"] == pytest.approx(tok_loss, rel=1e-5)
    assert m["loss/eviction"] == pytest.approx(ev_loss, rel=1e-5)


@pytest.mark.parametrize("mode,lr,cap", [("token", 1e-3, 1.05), ("sequence", 1e-5, 1.004)])
def test_tis_weights_on_stale_records_equal_a_hand_computation(tiny_model_dir, batch, mode, lr, cap):
    """One update per call: π_prox = the learner's replay at the start of the step, ρ = 1 and
    ``w = min(π_prox/π_engine, C)`` per action, or per rollout (its tokens; its eviction actions)."""
    records, adv = batch
    # sequence weights: a smaller step, as a rollout's summed log-ratio grows with its length, and a cap
    # that truncates some rollouts' eviction weights too (their summed log-ratios are within ±0.01)
    learner, state, _ = moved_learner(tiny_model_dir, records, adv, tis=mode, tis_cap=cap, lr=lr)
    rec = rollout_logprobs(records, 2)
    tok, mask, ev, rmask = replay_under(tiny_model_dir, state, records)
    m = learner.train_step(records, adv, global_num_sequences=len(records))
    s = len(records)
    for kind, now, old, valid in (("token", tok, rec.token_logprobs, mask),
                                  ("eviction", ev, rec.eviction_logprobs, rmask[:, :, None].expand_as(ev))):
        weights, truncated, k3, loss = [], 0, [], 0.0
        for i in range(s):
            idx = [tuple(x) for x in valid[i].nonzero().tolist()]
            seq = sum(float(now[i][j]) - float(old[i][j]) for j in idx)
            n_rounds = int(rmask[i].sum())
            for j in idx:
                d = float(now[i][j]) - float(old[i][j])
                log_w = d if mode == "token" else seq
                w = min(math.exp(log_w), cap)
                weights.append(w)
                truncated += math.exp(log_w) > cap
                k3.append(math.exp(d) - 1 - d)
                # ρ = 1: the term is w·A, aggregated as section 1 says
                loss -= w * adv[i] / (s * MAX_NEW if kind == "token" else s * n_rounds)
        n = len(weights)
        assert m[f"{kind}/actions"] == n
        assert m[f"{kind}/tis_weight_mean"] == pytest.approx(sum(weights) / n, rel=2e-5), kind
        assert m[f"{kind}/tis_weight_min"] == pytest.approx(min(weights), rel=2e-5), kind
        assert m[f"{kind}/tis_weight_max"] == pytest.approx(max(weights), rel=2e-5), kind
        assert m[f"{kind}/tis_clip_frac"] == pytest.approx(truncated / n, abs=1e-9), kind
        print(f"\n{mode} {kind}: weight mean {sum(weights) / n:.4f} min {min(weights):.4f} max {max(weights):.4f}, "
              f"truncated {truncated}/{n}, mismatch kl {sum(k3) / n:.2e}")
        assert 0 < truncated < n, (kind, truncated, n)        # the cap bites, but not everywhere
        assert m[f"{kind}/engine_mismatch_kl"] == pytest.approx(sum(k3) / n, rel=1e-4), kind
        assert m[f"{kind}/ratio_mean"] == 1.0 and m[f"{kind}/clip_frac"] == 0.0   # ρ against π_prox
        assert m[f"loss/{kind}"] == pytest.approx(loss, rel=1e-5), kind


@pytest.mark.parametrize("zero_stage", [2, 3])   # ZeRO 3 gathers the weights in the no-grad pass too
def test_tis_with_mini_batches_uses_the_start_of_step_weights(tiny_model_dir, batch, zero_stage):
    """Two mini-batches: the second is trained after the first's optimizer step, but its TIS weights
    still come from π_prox at the start of the call (the extra no-grad pass), so all weights equal
    the hand computation from the start-of-step replay; its ratios move away from 1."""
    records, adv = batch
    learner, state, _ = moved_learner(tiny_model_dir, records, adv, steps=1, tis="token", tis_cap=1.05,
                                      mini_batches=2, zero_stage=zero_stage)
    rec = rollout_logprobs(records, 2)
    tok, mask, ev, rmask = replay_under(tiny_model_dir, state, records)
    m = learner.train_step(records, adv, global_num_sequences=len(records))
    assert m["optimizer_steps"] == 2
    r_tok = torch.exp(tok - rec.token_logprobs).double()[mask]
    r_ev = torch.exp(ev - rec.eviction_logprobs).double()[rmask[:, :, None].expand_as(ev)]
    for kind, r in (("token", r_tok), ("eviction", r_ev)):
        w = torch.clamp(r, max=1.05)
        assert m[f"{kind}/tis_weight_mean"] == pytest.approx(float(w.mean()), rel=2e-5), kind
        assert m[f"{kind}/tis_weight_max"] == pytest.approx(float(w.max()), rel=2e-5), kind
        assert m[f"{kind}/tis_clip_frac"] == pytest.approx(float((r > 1.05).double().mean()), abs=1e-9), kind
    assert m["token/ratio_max"] > 1.0 + 1e-4 or m["token/ratio_min"] < 1.0 - 1e-4


def _dp_worker(rank: int, world: int, port: int, cfg: LearnerConfig, shards, out_dir: str) -> None:
    records, adv = shards[rank]
    n = sum(len(s[0]) for s in shards)
    learner = Learner(cfg, rank=rank, world_size=world, master_port=port)
    learner.train_step(records, adv, global_num_sequences=n)                   # the records go stale
    state = {k: t.clone() for k, t in learner.named_parameters_for_sync()}
    metrics = learner.train_step(records, adv, global_num_sequences=n)
    torch.save({"state": state, "metrics": metrics}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_tis_proximal_pass_over_two_ranks_with_uneven_micro_batches(tiny_model_dir, batch, tmp_path):
    """Two ZeRO-3 ranks with 6 and 2 records (3 and 1 micro-batches: rank 1 pads the no-grad
    π_prox pass with forwards, as ZeRO 3 gathers weights collectively), two mini-batches: both ranks
    report the TIS weights and ratio extremes of the whole batch, equal to the hand computation."""
    records, adv = batch
    cfg = LearnerConfig(model_path=str(tiny_model_dir), dtype="float32", zero_stage=3, max_len=MAX_NEW, lr=1e-3,
                        micro_batch_size=2, clip_eps=CLIP, grad_clip=None, mini_batches=2, tis="token",
                        tis_cap=1.05)
    shards = [(records[:6], adv[:6]), (records[6:], adv[6:])]
    torch.multiprocessing.spawn(_dp_worker, args=(2, free_port(), cfg, shards, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["metrics"] == r1["metrics"]
    m = r0["metrics"]
    rec = rollout_logprobs(records, 2)
    tok, mask, ev, rmask = replay_under(tiny_model_dir, r0["state"], records)
    r_tok = torch.exp(tok - rec.token_logprobs).double()[mask]
    r_ev = torch.exp(ev - rec.eviction_logprobs).double()[rmask[:, :, None].expand_as(ev)]
    for kind, r in (("token", r_tok), ("eviction", r_ev)):
        w = torch.clamp(r, max=1.05)
        assert m[f"{kind}/actions"] == r.numel()
        assert m[f"{kind}/tis_weight_mean"] == pytest.approx(float(w.mean()), rel=2e-5), kind
        assert m[f"{kind}/tis_weight_min"] == pytest.approx(float(w.min()), rel=2e-5), kind
        assert m[f"{kind}/tis_clip_frac"] == pytest.approx(float((r > 1.05).double().mean()), abs=1e-9), kind
        assert 0 < float((r > 1.05).double().mean()) < 1

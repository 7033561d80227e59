"""Eviction scorers. Every scorer rlmem registers (a new one inherits these): scores of the right
shape and values, blind to what lies outside the validity mask, rows scored independently, the same
under a reordering of KV heads or a rotation of the head space, usable on the vLLM engine's inputs
or refused there by name, and on the torch engine NGC's schedule and keep counts with records
that replay exactly. Then each heuristic's own rule on hand-made caches (computed here element by
element) and on the engine."""

from __future__ import annotations

import math

import pytest
import torch

from rlmem.engine.reference import ReferenceEngine
from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig, decide, keep_count
from rlmem.eviction.record import NEVER, evicted_at
from rlmem.eviction.scorers import ScoringInputs, get_scorer, scorer_names
from rlmem.models.loading import load_model, load_tokenizer
from rlmem.learner.replay import replay_forward, rollout_logprobs

# The registry, not a list: other test modules register test scorers, which are not rlmem's.
SCORERS = [n for n in scorer_names() if type(get_scorer(n)).__module__.startswith("rlmem.")]
BASELINES = [n for n in SCORERS if not get_scorer(n).learned]
HQ, HKV, W, D, C = 4, 2, 3, 8, 7
SCALE = 1 / math.sqrt(D)


@pytest.fixture(scope="module")
def cache():
    """Two rows of a hand-made cache: row 0 has 7 alive keys, row 1 has 5 (slots 5, 6 empty)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, HQ, W, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, HKV, C, D, generator=g, dtype=torch.float64)
    k[0, :, 3] = k[0, :, 1] * 1.01          # three near-copies of one key (redundancy for R-KV)
    k[0, :, 5] = k[0, :, 1] * 0.99
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    pos = torch.tensor([[0, 1, 2, 5, 9, 10, 11], [0, 3, 4, 6, 7, -1, -1]])
    return q, k, valid, pos


PROMPT_LENS = torch.tensor([3, 4])   # row 0: positions 0-2 are the prompt; row 1: positions 0 and 3


def _inputs(cache, state=None):
    q, k, valid, pos = cache
    return ScoringInputs(q, k, valid, pos, SCALE, 0, state, PROMPT_LENS)


# --- every registered scorer -------------------------------------------------------------------


def _any_inputs(cache, name: str) -> ScoringInputs:
    """The hand-made cache, with a positive per-key state (0 outside the mask) for scorers that observe steps."""
    state = None
    if get_scorer(name).observes:
        state = torch.rand(2, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
        state = state.masked_fill(~cache[2], 0.0)
    return _inputs(cache, state)


def _valid_scores_equal(got, want, valid, rel=1e-12):
    assert got.shape == want.shape
    assert torch.allclose(got[valid], want[valid], rtol=rel, atol=1e-15), (got[valid] - want[valid]).abs().max()


def test_every_scorer_file_registers_a_scorer_these_tests_cover():
    """A scorer file that __init__ forgets to import registers nothing and would escape these tests."""
    from pathlib import Path

    import rlmem.eviction.scorers as pkg

    files = {p.stem for p in Path(pkg.__file__).parent.glob("*.py") if "\n@register_scorer\n" in p.read_text()}
    assert {type(get_scorer(n)).__module__.rsplit(".", 1)[1] for n in SCORERS} == files
    assert "ngc" in SCORERS and len(BASELINES) == len(SCORERS) - 1 >= 8


@pytest.mark.parametrize("name", SCORERS)
def test_scores_have_one_value_per_slot_and_zero_outside_the_mask(cache, name):
    """``[B, C]`` floats; alive keys get a number or +inf (always keep), never NaN or -inf; empty slots 0."""
    valid = cache[2]
    s = get_scorer(name).scores(_any_inputs(cache, name))
    assert s.shape == (2, C) and s.dtype.is_floating_point
    assert not torch.isnan(s[valid]).any() and (s[valid] > -math.inf).all()
    assert (s[~valid] == 0).all()
    # the rule tells keys apart (a constant would make every decision a tie)
    assert all(len(set(s[b, valid[b]].tolist())) > 1 for b in range(2))


@pytest.mark.parametrize("name", SCORERS)
def test_scores_ignore_padding_and_whatever_the_empty_slots_hold(cache, name):
    """Engines pad rows to the longest (vLLM: to the longest request of a round group) and leave stale
    keys in empty slots: neither may change an alive key's score."""
    q, k, valid, pos = cache
    inp = _any_inputs(cache, name)
    want = get_scorer(name).scores(inp)
    g = torch.Generator().manual_seed(7)
    extra = 3
    k2 = torch.cat([k, torch.zeros(2, HKV, extra, D, dtype=k.dtype)], dim=2)
    valid2 = torch.cat([valid, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    pos2 = torch.cat([pos, torch.full((2, extra), -1)], dim=1)
    junk = ~valid2[:, None, :, None].expand_as(k2)
    k2 = torch.where(junk, 100 * torch.randn(k2.shape, generator=g, dtype=k2.dtype), k2)
    state2 = None
    if inp.state is not None:
        state2 = torch.cat([inp.state, torch.zeros(2, extra, dtype=inp.state.dtype)], dim=1)
        state2 = torch.where(valid2, state2, torch.full_like(state2, 50.0))
    got = get_scorer(name).scores(ScoringInputs(q, k2, valid2, pos2, SCALE, 0, state2, PROMPT_LENS))
    _valid_scores_equal(got[:, :C], want, valid)
    assert (got[~valid2] == 0).all()


@pytest.mark.parametrize("name", SCORERS)
def test_rows_are_scored_independently(cache, name):
    """A row's scores do not depend on which other requests share its batch, or on their order."""
    q, k, valid, pos = cache
    inp = _any_inputs(cache, name)
    want = get_scorer(name).scores(inp)
    for rows in ([0], [1], [1, 0]):
        r = torch.tensor(rows)
        sub = ScoringInputs(q[r], k[r], valid[r], pos[r], SCALE, 0,
                            None if inp.state is None else inp.state[r], PROMPT_LENS[r])
        _valid_scores_equal(get_scorer(name).scores(sub), want[r], valid[r])


@pytest.mark.parametrize("name", SCORERS)
def test_kv_head_order_and_a_rotation_of_the_head_space_do_not_matter(cache, name):
    """Scores average over heads (GQA: query head h belongs to KV head h // G), so swapping KV heads
    together with their query groups changes nothing; they depend on dot products, norms and
    positions, so rotating every query and key by one orthogonal matrix changes nothing either."""
    q, k, valid, pos = cache
    inp = _any_inputs(cache, name)
    want = get_scorer(name).scores(inp)
    group = HQ // HKV
    perm = torch.tensor([1, 0])
    qperm = torch.cat([torch.arange(h * group, (h + 1) * group) for h in perm.tolist()])
    swapped = ScoringInputs(q[:, qperm], k[:, perm], valid, pos, SCALE, 0, inp.state, PROMPT_LENS)
    _valid_scores_equal(get_scorer(name).scores(swapped), want, valid)
    rot, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    rotated = ScoringInputs(q @ rot, k @ rot, valid, pos, SCALE, 0, inp.state, PROMPT_LENS)
    _valid_scores_equal(get_scorer(name).scores(rotated), want, valid, rel=1e-9)


@pytest.mark.parametrize("name", SCORERS)
def test_vllm_path_scores_bf16_cache_keys_or_refuses_the_scorer_by_name(cache, name):
    """The vLLM worker scores at round time only: keys read from the paged cache in its dtype (bf16 for
    a bf16 model, zeros past each row's alive keys), no per-key state, prompt lengths on the CPU. A
    scorer that needs every step's attention is refused before vLLM starts, naming the scorer."""
    from rlmem.engine.vllm.engine import check_eviction

    cfg = EvictionConfig(delta=32, eps=0.5, block_size=32, window=W, scorer=name)
    if get_scorer(name).observes:
        with pytest.raises(ValueError, match=f"eviction.scorer='{name}' observes every decoding step"):
            check_eviction(cfg, 32)
        return
    check_eviction(cfg, 32)
    q, k, valid, pos = cache
    k16 = k.masked_fill(~valid[:, None, :, None], 0.0).to(torch.bfloat16)
    got = get_scorer(name).scores(ScoringInputs(q.to(torch.bfloat16), k16, valid, pos, SCALE, 0, None, PROMPT_LENS))
    want = get_scorer(name).scores(_inputs(cache))
    assert got.shape == (2, C) and not torch.isnan(got[valid]).any() and (got[~valid] == 0).all()
    finite = valid & torch.isfinite(want)
    assert torch.equal(torch.isinf(got[valid]), torch.isinf(want[valid]))
    spread = float(want[finite].max() - want[finite].min())
    assert (got[finite].double() - want[finite]).abs().max() <= 0.05 * spread     # bf16 rounding only


def _attn(q_vec, keys_h, alive):
    """Softmax of one query over the alive keys of one KV head (python loop, no batching)."""
    logits = [float(q_vec @ keys_h[c]) * SCALE for c in alive]
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return {c: v / sum(e) for c, v in zip(alive, e)}


def _window_mean(cache, b, h, queries):
    """Mean attention over the given window queries and the query heads of KV head h."""
    q, k, valid, _ = cache
    alive = [c for c in range(C) if valid[b, c]]
    acc = {c: 0.0 for c in alive}
    heads = range(h * (HQ // HKV), (h + 1) * (HQ // HKV))
    for hq in heads:
        for t in queries:
            for c, v in _attn(q[b, hq, t], k[b, h], alive).items():
                acc[c] += v / (len(heads) * len(queries))
    return acc


def _pool(d, kernel):
    keys = sorted(d)
    return {c: max(d[x] for x in keys if abs(x - c) <= kernel // 2) for c in keys}


def _check(got, want_rows, cache):
    _, _, valid, _ = cache
    for b, want in enumerate(want_rows):
        for c in range(C):
            if valid[b, c]:
                assert got[b, c].item() == pytest.approx(want[c], rel=1e-9, abs=1e-12), (b, c)
            else:
                assert got[b, c].item() == 0.0


def test_knorm_rule(cache):
    _, k, valid, _ = cache
    want = [{c: -sum(k[b, h, c].norm().item() for h in range(HKV)) / HKV for c in range(C)} for b in range(2)]
    _check(get_scorer("knorm").scores(_inputs(cache)), want, cache)


def test_keydiff_rule(cache):
    _, k, valid, _ = cache
    want = []
    for b in range(2):
        alive = [c for c in range(C) if valid[b, c]]
        row = {}
        for c in alive:
            total = 0.0
            for h in range(HKV):
                anchor = sum(k[b, h, j] / k[b, h, j].norm() for j in alive) / len(alive)
                total += float(k[b, h, c] @ anchor / (k[b, h, c].norm() * anchor.norm()))
            row[c] = -total / HKV
        want.append(row)
    _check(get_scorer("keydiff").scores(_inputs(cache)), want, cache)


def test_snapkv_rule_window_attention_max_pooled(cache):
    want = []
    for b in range(2):
        per_head = [_pool(_window_mean(cache, b, h, range(W)), 5) for h in range(HKV)]
        want.append({c: sum(p[c] for p in per_head) / HKV for c in per_head[0]})
    _check(get_scorer("snapkv").scores(_inputs(cache)), want, cache)
    assert get_scorer("snapkv", kernel_size=1).scores(_inputs(cache))[1, 0].item() == pytest.approx(
        sum(_window_mean(cache, 1, h, range(W))[0] for h in range(HKV)) / HKV)


def test_tova_rule_last_query(cache):
    want = []
    for b in range(2):
        per_head = [_window_mean(cache, b, h, [W - 1]) for h in range(HKV)]
        want.append({c: sum(p[c] for p in per_head) / HKV for c in per_head[0]})
    _check(get_scorer("tova").scores(_inputs(cache)), want, cache)


def test_streamingllm_rule_sinks_then_recency(cache):
    s = get_scorer("streamingllm").scores(_inputs(cache))
    assert s[0].tolist() == [math.inf, math.inf, math.inf, 5.0, 9.0, 10.0, 11.0]
    assert s[1].tolist() == [math.inf, math.inf, 4.0, 6.0, 7.0, 0.0, 0.0]
    assert get_scorer("streamingllm", sinks=1).scores(_inputs(cache))[1, :3].tolist() == [math.inf, 3.0, 4.0]


def test_streamingllm_prompt_rule_whole_prompt_then_recency(cache):
    """Prompt keys outrank every generated key (older first), then newer generated keys rank higher."""
    s = get_scorer("streamingllm_prompt").scores(_inputs(cache))
    assert s[0].tolist() == [24.0, 23.0, 22.0, 5.0, 9.0, 10.0, 11.0]     # top = 12
    assert s[1].tolist() == [16.0, 13.0, 4.0, 6.0, 7.0, 0.0, 0.0]        # top = 8; slots 5, 6 not alive
    q, k, valid, pos = cache
    with pytest.raises(ValueError, match="prompt lengths"):
        get_scorer("streamingllm_prompt").scores(ScoringInputs(q, k, valid, pos, SCALE, 0))


def test_rkv_rule_importance_minus_redundancy(cache):
    _, k, valid, _ = cache
    lam, thr = 0.1, 0.5
    want = []
    for b in range(2):
        alive = [c for c in range(C) if valid[b, c]]
        row = {c: 0.0 for c in alive}
        for h in range(HKV):
            imp = _pool(_window_mean(cache, b, h, range(W)), 5)
            unit = {c: k[b, h, c] / k[b, h, c].norm() for c in alive}
            means = {}
            for i in alive:
                sim = {j: (0.0 if j == i else float(unit[i] @ unit[j])) for j in alive}
                similar = [j for j in alive if sim[j] > thr]
                if similar:
                    sim[max(similar)] = 0.0          # the newest similar key is not counted
                means[i] = sum(sim.values()) / len(alive)
            z = sum(math.exp(v) for v in means.values())
            for c in alive:
                row[c] += (lam * imp[c] - (1 - lam) * math.exp(means[c]) / z) / HKV
        want.append(row)
    _check(get_scorer("rkv").scores(_inputs(cache)), want, cache)
    # the three near-copies (slots 1, 3, 5) are more redundant than the other keys of row 0
    from rlmem.eviction.scorers.rkv import redundancy

    red = redundancy(cache[1], cache[2], thr)[0].mean(dim=0)
    assert red[[1, 3, 5]].min() > red[[0, 2, 4, 6]].max()


def test_h2o_accumulates_attention_over_steps_since_each_key_entered(cache):
    q, k, valid, _ = cache
    h2o = get_scorer("h2o")
    state = torch.zeros(2, C, dtype=torch.float64)
    # three decode steps: step s sees the keys 0..4+s (row 0) / all alive (row 1)
    want = [{c: 0.0 for c in range(C)} for _ in range(2)]
    for s in range(3):
        visible = torch.zeros(2, 1, C, dtype=torch.bool)
        visible[0, 0, : 5 + s] = True
        visible[1, 0, :5] = True
        state = h2o.observe(q[:, :, s:s + 1], k, visible, SCALE, state)
        for b in range(2):
            alive = [c for c in range(C) if visible[b, 0, c]]
            for hq in range(HQ):
                for c, v in _attn(q[b, hq, s], k[b, hq // (HQ // HKV)], alive).items():
                    want[b][c] += v / HQ
    _check(h2o.scores(_inputs(cache, state)), want, cache)
    assert state[0, 6] > 0 and want[0][6] == pytest.approx(state[0, 6].item(), rel=1e-6)
    recent = get_scorer("h2o", recent=2).scores(_inputs(cache, state))
    assert torch.isinf(recent[0, 5:]).all() and torch.isinf(recent[1, 3:5]).all() and not torch.isinf(recent[1, :3]).any()


@pytest.mark.parametrize("name", BASELINES)
def test_selection_is_top_k_of_block_means_with_ngc_keep_counts(cache, name):
    """decide(): the kept eligible blocks are the top-k block means, k from NGC's keep count; b = 1 works."""
    state = torch.rand(2, C, generator=torch.Generator().manual_seed(1)) if name == "h2o" else None
    inp = _inputs(cache, state)
    scores = get_scorer(name).scores(inp)
    for b, eps in ((2, 0.5), (1, 0.5), (1, 0.75)):
        cfgs = [EvictionConfig(delta=8, eps=eps, block_size=b, window=W, scorer=name)] * 2
        for row, d in enumerate(decide(get_scorer(name), inp, cfgs, None, greedy=False)):
            n_alive = int(cache[2][row].sum())
            n = -(-n_alive // b)
            assert d.num_blocks == n and d.logprob == 0.0
            assert len(d.kept) == keep_count(n, eps, 1) - 1
            means = [scores[row, j * b: min((j + 1) * b, n_alive)].mean().item() for j in range(n - 1)]
            order = sorted(range(n - 1), key=lambda j: -means[j])
            assert sorted(means[j] for j in d.kept) == sorted(means[j] for j in order[: len(d.kept)])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, "float64"), load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("block", [4, 1])
def test_baseline_records_share_ngc_schedule_and_replay_tokens_exactly(tiny, block):
    model, tok = tiny
    engine = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    prompts = [tok("Using 3 5 7 make 22.").input_ids, tok("Hi").input_ids]
    sp = SamplingParams(max_new_tokens=48, seed=4)
    ngc = engine.generate(prompts, sp, EvictionConfig(delta=16, eps=0.5, block_size=block, window=4),
                          greedy_evictions=True)
    recs = []
    for name in BASELINES:
        cfg = EvictionConfig(delta=16, eps=0.5, block_size=block, window=4, scorer=name)
        out = engine.generate(prompts, sp, cfg)
        for a, r in zip(ngc, out):
            assert r.to_dict()["eviction"]["scorer"] == name
            assert [x.t for x in r.eviction.rounds] == [x.t for x in a.eviction.rounds] != []
            for ra, rb in zip(a.eviction.rounds, r.eviction.rounds):
                for la, lb in zip(ra.layers, rb.layers):
                    assert (la.num_blocks, len(la.kept)) == (lb.num_blocks, len(lb.kept)) and lb.logprob == 0.0
            assert r.extra["peak_kv"] == a.extra["peak_kv"]
        recs += out
    with torch.no_grad():
        rep = replay_forward(model, recs)
    old = rollout_logprobs(recs, model.config.num_hidden_layers, dtype=torch.float64)
    assert (rep.token_logprobs - old.token_logprobs)[rep.token_mask].abs().max() < 1e-9
    assert rep.eviction_logprobs.abs().max() == 0


def test_baselines_keep_what_their_rule_says_on_the_engine(tiny):
    """StreamingLLM keeps the sink block and the newest blocks; KNorm keeps, in each layer, the
    eligible blocks whose post-RoPE keys have the smallest mean norm (keys taken here from a plain
    HF forward of the prompt: the first round comes right after prefill, before any eviction)."""
    model, tok = tiny
    engine = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    prompt = [tok("abcdefghijklmnopqrstuvwxyz").input_ids]
    rec = engine.generate(prompt, SamplingParams(max_new_tokens=40, seed=0),
                          EvictionConfig(delta=16, eps=0.5, block_size=4, window=4, scorer="streamingllm"))[0]
    first = rec.eviction.rounds[0]
    for layer in first.layers:
        n = layer.num_blocks
        m = len(layer.kept)
        assert sorted(layer.kept) == [0] + list(range(n - 1 - (m - 1), n - 1))   # sinks + most recent eligible

    rec = engine.generate(prompt, SamplingParams(max_new_tokens=40, seed=0),
                          EvictionConfig(delta=16, eps=0.5, block_size=4, window=4, scorer="knorm"))[0]
    first = rec.eviction.rounds[0]
    p = len(prompt[0])
    assert first.t == p == 26                                   # round 1 right after the 26-token prefill
    with torch.no_grad():
        cache = model(torch.tensor(prompt), use_cache=True).past_key_values
    kept_sets = []
    for l, layer in enumerate(first.layers):
        norms = cache.layers[l].keys[0].norm(dim=-1).mean(dim=0)            # [p]: mean over KV heads
        blocks = [-norms[j * 4: (j + 1) * 4].mean().item() for j in range(-(-p // 4))]
        eligible = blocks[:-1]                                   # the newest block is protected
        assert layer.num_blocks == len(blocks) == 7 and len(layer.kept) == keep_count(7, 0.5, 1) - 1 == 3
        top = sorted(range(len(eligible)), key=lambda j: -eligible[j])[:3]
        assert sorted(layer.kept) == sorted(top), (l, eligible)
        kept_sets.append(sorted(layer.kept))
    assert kept_sets[0] != kept_sets[1]                         # each layer ranks its own keys


def test_streamingllm_prompt_keeps_the_whole_prompt_in_every_layer_on_the_engine(tiny):
    """Through every round of a batch with prompts of different lengths, no layer evicts a prompt
    token, and the generated tokens kept at the end are the newest ones."""
    model, tok = tiny
    engine = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    prompts = [tok("3 5 7 : 22").input_ids, tok("Hi").input_ids]
    # δ = 32, ε = 0.5: the first round keeps 3 of 7 eligible blocks, room for a prompt of up to 12.
    cfg = EvictionConfig(delta=32, eps=0.5, block_size=4, window=4, scorer="streamingllm_prompt")
    for rec in engine.generate(prompts, SamplingParams(max_new_tokens=120, seed=2), cfg):
        assert rec.num_rounds >= 3 and len(rec.prompt_ids) <= 12
        ea = evicted_at(rec, model.config.num_hidden_layers)            # [L, n]
        p = len(rec.prompt_ids)
        assert (ea[:, :p] == NEVER).all()
        # The block holding the prompt's tail may carry a few generated keys with it; after it,
        # the surviving generated keys are one run that ends at the newest token.
        after = -(-p // 4) * 4
        kept = (ea[0, after:] == NEVER).nonzero().flatten().tolist()
        assert kept == list(range(kept[0], rec.seq_len - after)) and kept[0] > 0
        assert (ea == ea[0]).all()                                      # the rule ignores attention: layers agree

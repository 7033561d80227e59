"""The scorer seam: heuristics behind the NGC schedule, records that say who made them, and the
predicted schedule peak against what the engine measures."""

from __future__ import annotations

import itertools

import pytest
import torch

from rlmem.engine.reference import ReferenceEngine
from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig, keep_count, round_times
from rlmem.eviction.record import RolloutRecord
from rlmem.eviction.scorers import Scorer, ScoringInputs, get_scorer, register_scorer, scorer_names
from rlmem.metrics import schedule_peak
from rlmem.models.loading import load_model, load_tokenizer
from rlmem.learner.replay import replay_forward, rollout_logprobs


@register_scorer
class OldestFirst(Scorer):
    """A test heuristic: keep the oldest keys (score = -position)."""

    name = "test-oldest"

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        return -inp.positions.to(torch.float32)


@register_scorer
class CountVisits(Scorer):
    """A test heuristic that observes every step: counts the queries that could see each key."""

    name = "test-visits"
    observes = True

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        return inp.state

    def observe(self, query, keys, visible, scaling, state):
        return state + visible.sum(dim=1).to(state.dtype)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, "float64"), load_tokenizer(tiny_model_dir)


def test_registry_names_and_errors():
    assert "ngc" in scorer_names() and get_scorer("ngc").learned
    assert not get_scorer("test-oldest").learned
    with pytest.raises(ValueError, match="unknown eviction scorer 'nope'"):
        get_scorer("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_scorer(type("Other", (Scorer,), {"name": "ngc"}))


def test_heuristic_records_keep_the_schedule_replay_tokens_and_carry_zero_logprobs(tiny):
    model, tok = tiny
    ngc = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4)
    heur = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4, scorer="test-oldest")
    prompt = [tok("Solve 12+7.").input_ids]
    engine = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    a = engine.generate(prompt, SamplingParams(max_new_tokens=60, seed=2), ngc)[0]
    b = engine.generate(prompt, SamplingParams(max_new_tokens=60, seed=2), heur)[0]
    assert [r.t for r in a.eviction.rounds] == [r.t for r in b.eviction.rounds]
    for ra, rb in zip(a.eviction.rounds, b.eviction.rounds):
        for la, lb in zip(ra.layers, rb.layers):
            assert la.num_blocks == lb.num_blocks and len(la.kept) == len(lb.kept)   # same keep count
            assert lb.logprob == 0.0
            assert lb.kept == list(range(len(lb.kept)))      # oldest blocks, deterministically
    d = b.to_dict()
    assert d["eviction"]["scorer"] == "test-oldest"
    back = RolloutRecord.from_dict(d)
    assert back.eviction.config.scorer == "test-oldest"
    with torch.no_grad():
        out = replay_forward(model, [back])
    old = rollout_logprobs([back], 2, dtype=torch.float64)
    assert (out.token_logprobs - old.token_logprobs)[out.token_mask].abs().max() < 1e-9
    assert out.eviction_logprobs.abs().max() == 0          # not an action: nothing recomputed


def test_records_without_scorer_field_are_ngc(tiny):
    model, tok = tiny
    cfg = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4)
    rec = ReferenceEngine(model, tok, seed=0).generate([tok("hello there").input_ids],
                                                        SamplingParams(max_new_tokens=40), cfg)[0]
    d = rec.to_dict()
    del d["eviction"]["scorer"]
    assert RolloutRecord.from_dict(d).eviction.config.scorer == "ngc"


def test_observing_scorer_state_follows_compaction(tiny):
    """The state of an observing scorer stays aligned with its keys through every compaction."""
    model, tok = tiny
    cfg = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4, scorer="test-visits")
    prompt = tok("abcdefghij").input_ids
    rec = ReferenceEngine(model, tok, seed=0, eos_token_ids=[]).generate(
        [prompt], SamplingParams(max_new_tokens=60), cfg)[0]
    # visits of key k by round t = number of queries q in [k, t) that saw it = t - k while alive; the
    # scorer keeps the most visited, i.e. the oldest alive blocks, at every round and layer
    assert len(rec.eviction.rounds) >= 3
    for rnd in rec.eviction.rounds:
        for layer in rnd.layers:
            assert layer.kept == list(range(len(layer.kept)))


@pytest.mark.parametrize("eps,n_blocks,want", [(0.9, 15, 2), (0.3, 45, 32), (0.5, 4, 2), (0.75, 5, 1)])
def test_keep_count_regressions(eps, n_blocks, want):
    assert keep_count(n_blocks, eps, 1) == want


def test_schedule_peak_equals_the_engines_measured_peak_over_a_grid(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    engine = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    prompts = {3: tok("abc").input_ids, 37: tok("x" * 37).input_ids}
    assert {k: len(v) for k, v in prompts.items()} == {3: 3, 37: 37}
    checked = 0
    for delta, b, eps, c in itertools.product((8, 20), (4, 8), (0.3, 0.5, 0.9), (30, 75)):
        if b > delta:
            continue
        cfg = EvictionConfig(delta=delta, eps=eps, block_size=b, window=4)
        recs = engine.generate(list(prompts.values()), SamplingParams(max_new_tokens=c), cfg)
        for p, rec in zip(prompts, recs):
            assert len(rec.completion_ids) == c
            assert schedule_peak(p, c, cfg) == rec.extra["peak_kv"], (p, c, cfg)
            checked += bool(round_times(p, p + c, cfg))
    assert checked >= 40


def _inputs(n: int, *, seed: int = 0) -> ScoringInputs:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(1, n, dtype=torch.bool)
    return ScoringInputs(torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64),
                         torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64), valid,
                         torch.arange(n)[None], 8 ** -0.5, prompt_lens=torch.tensor([3]))


def test_scorer_settings_are_declared_checked_and_named():
    """A scorer's settings are its __init__ keywords; an unknown key or a bad value is refused naming
    the scorer and the key, wherever the settings come from (get_scorer, EvictionConfig, a record)."""
    from rlmem.eviction.scorers.base import check_scorer_args

    assert get_scorer("streamingllm").settings() == {"sinks": 4}
    assert get_scorer("snapkv").settings() == {"kernel_size": 5}
    assert get_scorer("rkv").settings() == {"mix_lambda": 0.1, "threshold": 0.5, "kernel_size": 5}
    assert get_scorer("ngc").settings() == {} and get_scorer("knorm").settings() == {}
    with pytest.raises(ValueError, match=r"^eviction\.scorer_args: scorer 'snapkv' has no setting 'sinks' "
                                         r"\(its settings: kernel_size\)$"):
        get_scorer("snapkv", sinks=2)
    with pytest.raises(ValueError, match=r"scorer 'ngc' has no setting 'tau' \(it has no settings\)"):
        EvictionConfig(scorer="ngc", scorer_args={"tau": 2})
    with pytest.raises(ValueError, match=r"scorer 'rkv', setting 'mix_lambda': expected a number \(got 'high'\)"):
        check_scorer_args("rkv", {"mix_lambda": "high"})
    with pytest.raises(ValueError, match=r"^eviction\.scorer_args: snapkv: kernel_size must be an odd integer"):
        EvictionConfig(scorer="snapkv", scorer_args={"kernel_size": 4})
    cfg = EvictionConfig(scorer="rkv", scorer_args={"mix_lambda": "0.5", "kernel_size": "3"})   # CLI strings
    assert cfg.scorer_args == {"kernel_size": 3, "mix_lambda": 0.5} and hash(cfg) == hash(
        EvictionConfig(scorer="rkv", scorer_args={"kernel_size": 3, "mix_lambda": 0.5}))
    scorer = cfg.make_scorer()
    assert (scorer.mix_lambda, scorer.kernel_size, scorer.threshold) == (0.5, 3, 0.5)
    with pytest.raises(TypeError, match="immutable"):
        cfg.scorer_args["kernel_size"] = 7


@pytest.mark.parametrize("sinks", [0, 2, 6])
def test_streamingllm_sinks_setting_keeps_the_first_positions(sinks):
    s = get_scorer("streamingllm", sinks=sinks).scores(_inputs(12))[0]
    assert torch.isinf(s[:sinks]).all() and torch.isfinite(s[sinks:]).all()
    assert s[sinks:].tolist() == [float(p) for p in range(sinks, 12)]   # then the most recent


def test_snapkv_kernel_and_rkv_lambda_settings_change_the_scores():
    from rlmem.eviction.scorers import window_attention

    inp = _inputs(16, seed=1)
    mean_att = window_attention(inp.queries, inp.keys, inp.valid, inp.scaling).mean(dim=(1, 2, 3))[0]
    assert torch.allclose(get_scorer("snapkv", kernel_size=1).scores(inp)[0], mean_att)   # no pooling
    wide = get_scorer("snapkv", kernel_size=7).scores(inp)[0]
    assert not torch.allclose(wide, mean_att) and (wide >= get_scorer("snapkv", kernel_size=3).scores(inp)[0] - 1e-12).all()
    # R-KV with λ = 1 is its pooled importance alone (no redundancy term)
    assert torch.allclose(get_scorer("rkv", mix_lambda=1.0, kernel_size=1).scores(inp)[0], mean_att)
    assert not torch.allclose(get_scorer("rkv", mix_lambda=0.0).scores(inp)[0], get_scorer("rkv").scores(inp)[0])


def test_engine_uses_the_scorer_settings_and_the_record_states_them(tiny):
    """StreamingLLM with sinks=8 never evicts positions 0..7 (two blocks of 4) in any layer; with its
    default (4) positions 4..7 go. The record states every setting, defaults included, and replays."""
    from rlmem.eviction.record import evicted_at

    model, tok = tiny
    prompt = [list(range(5, 11))]
    engine = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    out = {}
    for sinks in (None, 8):
        cfg = EvictionConfig(delta=16, eps=0.25, block_size=4, window=4, scorer="streamingllm",
                             scorer_args={} if sinks is None else {"sinks": sinks})
        rec = engine.generate(prompt, SamplingParams(max_new_tokens=70, seed=1), cfg)[0]
        assert rec.num_rounds >= 3
        assert rec.to_dict()["eviction"]["scorer_args"] == {"sinks": sinks or 4}
        back = RolloutRecord.from_dict(rec.to_dict())
        assert back.eviction.config.scorer_args == {"sinks": sinks or 4}
        out[sinks] = evicted_at(back, 2)
    never = 2 ** 62
    assert (out[8][:, :8] == never).all()
    assert (out[None][:, :4] == never).all() and (out[None][:, 4:8] < never).all()
    with torch.no_grad():
        rep = replay_forward(model, [back])
    assert (rep.token_logprobs - rollout_logprobs([back], 2, dtype=torch.float64).token_logprobs)[
        rep.token_mask].abs().max() < 1e-9

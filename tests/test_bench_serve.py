"""``rlmem bench serve``: its refusals (fast) and one real small run on the tiny model (one server,
both phases; about two minutes on a loaded 2-core machine, most of it the server's start-up)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from rlmem.bench.serve import percentile, running_seqs, sum_samples
from rlmem.cli import main
from rlmem.engine.registry import engine_unavailable_reason


def _run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:      # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("extra, names", [
    (["--clients", "0"], "--clients"),
    (["--requests", "0"], "--requests"),
    (["--kv-blocks", "17", "--prompt-tokens", "32", "--new-tokens", "512"], "--kv-blocks 17"),
    (["--eps", "0"], "--eps"),
    (["--block-size", "16"], "--block-size"),
    (["--new-tokens", "5000", "--kv-blocks", "200"], "max_position_embeddings"),
])
def test_refusals_are_one_line_exit_2(tiny_model_dir, extra, names):
    """Bad flags end before any server starts: exit 2, one error line naming the flag, nothing on stdout."""
    code, out, err = _run(["bench", "serve", "--model", tiny_model_dir, *extra])
    assert code == 2
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and names in lines[0], err
    assert "Traceback" not in err and out == ""


def test_kv_blocks_message_says_what_one_request_needs(tiny_model_dir):
    # 32 + 512 tokens = 17 blocks of 32, plus vLLM's null block: 18 is the least pool
    code, _, err = _run(["bench", "serve", "--model", tiny_model_dir, "--kv-blocks", "17"])
    assert code == 2 and "needs 17 blocks" in err and "at least 18" in err


def test_unknown_model_name_lists_known_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("RLMEM_CACHE", str(tmp_path))
    code, _, err = _run(["bench", "serve", "--model", "no-such-model"])
    assert code == 2 and "no-such-model: not found" in err and "smollm2-135m-instruct" in err


def test_percentile_and_metric_sums():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(map(float, range(1, 101))), 0.99) == 99.0
    assert percentile([5.0], 0.99) == 5.0
    samples = {'vllm:num_preemptions_total{engine="0",model_name="m"}': 3.0,
               'vllm:num_preemptions_total{engine="1",model_name="m"}': 2.0,
               "vllm:num_preemptions_created": 99.0}
    assert sum_samples(samples, "vllm:num_preemptions_total") == 5.0


def test_running_seqs_are_the_differences_of_the_schedulers_histogram():
    """Steps between two /metrics pages: 3 steps ran 2, 4, 4 requests (before them, 5 steps ran 1)."""
    from rlmem.serving.server import parse_metrics

    def page(counts: dict[int, int]) -> dict[str, float]:
        lines, cum = [], 0
        for le in (1, 2, 3, 4, 5):
            cum += counts.get(le, 0)
            lines.append(f'rlmem_step_running_seqs_bucket{{le="{float(le)}"}} {float(cum)}')
        lines += [f'rlmem_step_running_seqs_bucket{{le="+Inf"}} {float(cum)}',
                  f"rlmem_step_running_seqs_count {float(cum)}",
                  f"rlmem_step_running_seqs_sum {float(sum(k * v for k, v in counts.items()))}"]
        return parse_metrics("\n".join(lines))

    before, after = page({1: 5}), page({1: 5, 2: 1, 4: 2})
    assert running_seqs(before, after) == (pytest.approx(10 / 3), 4.0)
    assert running_seqs(after, after) == (0.0, 0.0)


@pytest.mark.slow
@pytest.mark.skipif(engine_unavailable_reason("vllm") is not None, reason="vllm engine unavailable")
def test_small_run_loses_nothing_and_reports_ratios(tiny_model_dir, tmp_path):
    """4 clients x 8 requests of 16 + 192 tokens at 16 KV blocks of 32: a full-cache request ends needing
    7 blocks (2 fit the 15 usable ones), an NGC one (eps 0.5, delta 32) at most 3 (5 fit)."""
    out = tmp_path / "r.json"
    code, stdout, err = _run(["bench", "serve", "--model", tiny_model_dir, "--kv-blocks", 16, "--clients", 4,
                              "--requests", 8, "--prompt-tokens", 16, "--new-tokens", 192, "--eps", 0.5,
                              "--delta", 32, "--out", out])
    assert code == 0, stdout[-2000:] + err[-2000:]
    r = json.loads(out.read_text())
    ngc, full = r["phases"]["eviction"], r["phases"]["full_cache"]
    for p in (ngc, full):
        assert p["requests"] == p["completed"] == 8 and p["lost"] == 0 and p["errors"] == []
        assert p["output_tokens"] == 8 * 192
        assert p["tokens_per_s"] == pytest.approx(p["output_tokens"] / p["seconds"])
        assert 0 < p["ttft_median_s"] <= p["ttft_p99_s"] < p["seconds"]
        assert 1 <= p["running_mean"] <= p["running_max"] <= r["max_num_seqs"]
    assert r["full_cache_blocks"] == 7 and r["max_num_seqs"] == 4
    assert ngc["freed_blocks"] > 0 and ngc["eviction_rounds"] > 0
    assert full["freed_blocks"] == 0 and full["eviction_rounds"] == 0
    assert r["ratios"]["tokens_per_s"] == pytest.approx(ngc["tokens_per_s"] / full["tokens_per_s"])
    assert r["ratios"]["ttft_p99_s"] == pytest.approx(ngc["ttft_p99_s"] / full["ttft_p99_s"])
    assert "eviction / full cache output tokens/s at 16 KV blocks" in stdout

"""The ``rlmem`` command: tiny-model, rollout, replay-check, and clear errors on bad input."""

import json
import subprocess
import sys

import pytest

RLMEM = [sys.executable, "-m", "rlmem.cli"]


def rlmem(*args, check=True):
    proc = subprocess.run(RLMEM + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlmem {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def rollout_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rlmem("tiny-model", d / "model", "--layers", 2, "--seed", 1)
    prompts = d / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Using 3 5 7, make 22."}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}]}) + "\n")
    out = d / "records.jsonl"
    proc = rlmem("rollout", "--model", d / "model", "--prompts", prompts, "--out", out, "--delta", 16, "--block-size", 4,
                 "--window", 4, "--max-new-tokens", 40, "--num-samples", 2, "--top-k", 30)
    assert "wrote 4 records" in proc.stdout
    return d, out


def test_rollout_writes_valid_records_with_chat_template(rollout_files):
    d, out = rollout_files
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 4 and all(l["eviction"]["rounds"] for l in lines)
    assert [l["prompt_index"] for l in lines] == [0, 0, 1, 1]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "model")
    assert tok.decode(lines[2]["prompt_ids"]).endswith("<think>\n")     # chat template applied to messages


def test_replay_check_passes_then_fails_on_tampered_record(rollout_files, tmp_path):
    d, out = rollout_files
    proc = rlmem("replay-check", out, "--model", d / "model")
    assert "OK" in proc.stdout and "max |eviction log-prob diff|" in proc.stdout
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    recs[1]["eviction"]["rounds"][0]["layers"][1]["logprob"] -= 0.5
    bad = tmp_path / "tampered.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = rlmem("replay-check", bad, "--model", d / "model", check=False)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout and "record 1, round 0, layer 1" in proc.stdout


def test_bad_inputs_get_clear_errors(rollout_files, tmp_path):
    d, out = rollout_files
    bad_prompts = tmp_path / "p.jsonl"
    bad_prompts.write_text('{"text": "no prompt field"}\n')
    proc = rlmem("rollout", "--model", d / "model", "--prompts", bad_prompts, "--out", tmp_path / "o.jsonl", check=False)
    assert proc.returncode != 0 and "p.jsonl:1" in proc.stderr and "prompt" in proc.stderr
    proc = rlmem("rollout", "--model", d / "model", "--prompts", bad_prompts, "--out", tmp_path / "o.jsonl",
                 "--delta", 4, "--window", 8, check=False)
    assert proc.returncode != 0 and "eviction.delta" in proc.stderr and "window" in proc.stderr
    proc = rlmem("rollout", "--model", d / "model", "--prompts", bad_prompts, "--out", tmp_path / "o.jsonl",
                 "--eps", 1.5, check=False)
    assert proc.returncode != 0 and "eviction.eps" in proc.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text(out.read_text().splitlines()[0].replace('"logprobs"', '"logprobz"') + "\n")
    proc = rlmem("replay-check", broken, "--model", d / "model", check=False)
    assert proc.returncode != 0 and "broken.jsonl:1" in proc.stderr and "logprobs" in proc.stderr
    proc = rlmem("replay-check", out, "--model", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr and "config.json" in proc.stderr


def test_inspect_draws_what_was_evicted(rollout_files, tmp_path):
    d, out = rollout_files
    proc = rlmem("inspect", out, "--index", 1, "--out", tmp_path, "--tokenizer", d / "model")
    assert "layer 0 at the end" in proc.stdout
    for name in ("record1_evictions.png", "record1_replay_mask.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    proc = rlmem("inspect", out, "--index", 9, "--out", tmp_path, check=False)
    assert proc.returncode != 0 and "--index 9" in proc.stderr

"""The ``rlmem`` command: tiny-model, rollout, replay-check, inspect, and clear errors on bad input.

The commands run in-process through ``rlmem.cli.main`` (fast: no torch import per call); one
subprocess test checks the installed entry point end to end.
"""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys

import pytest

from rlmem.cli import main


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def rlmem(*args, check=True) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:          # argparse errors
            code = e.code if isinstance(e.code, int) else 1
    res = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"rlmem {args} failed ({code}):\n{res.stdout}\n{res.stderr}")
    return res


def test_entry_point_runs_in_a_fresh_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlmem.cli", "tiny-model", tmp_path / "m", "--layers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (tmp_path / "m" / "config.json").is_file(), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "rlmem.cli", "inspect", tmp_path / "none.jsonl"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "none.jsonl" in proc.stderr


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


def test_replay_check_names_the_weights_that_sampled_training_records(rollout_files, tmp_path):
    """A training run's step-N records were sampled by the weights after step N - 1: on a MISMATCH
    the note names that checkpoint when the run kept it, else says none is left and quotes the
    learner's own replay of that step from metrics.jsonl."""
    d, out = rollout_files
    run = tmp_path / "run"
    (run / "records").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {path: models/start}\ntrainer: {resume: auto}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 20, "replay/max_abs_logprob_diff": 3.25e-05,
                                                   "replay/max_abs_eviction_logprob_diff": 1.5e-06}) + "\n")
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    recs[1]["eviction"]["rounds"][0]["layers"][1]["logprob"] -= 0.5   # replayed with other weights, as it were

    def check(step: int) -> str:
        path = run / "records" / f"step_{step:06d}.jsonl"
        for r in recs:
            r["sampled_by_step"] = step - 1   # extra fields sit at the top level of a record
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        proc = rlmem("replay-check", path, "--model", d / "model", check=False)
        assert proc.returncode == 1 and "MISMATCH" in proc.stdout
        return proc.stdout

    assert "replay them with --model models/start (the run's starting model)" in check(1)
    (run / "checkpoints" / "step_000040" / "hf").mkdir(parents=True)
    assert f"replay them with --model {run / 'checkpoints' / 'step_000040' / 'hf'}" in check(41)
    note = check(20)
    assert "keeps no checkpoint of step 19" in note and "cannot be replayed now" in note
    assert "max |token log-prob diff| 3.250e-05, eviction 1.500e-06 (metrics.jsonl, step 20)" in note


def test_bad_inputs_get_clear_errors(rollout_files, tmp_path):
    d, out = rollout_files
    bad_prompts = tmp_path / "p.jsonl"
    bad_prompts.write_text('{"text": "no prompt field"}\n')
    proc = rlmem("rollout", "--model", d / "model", "--prompts", bad_prompts, "--out", tmp_path / "o.jsonl", check=False)
    assert proc.returncode == 2 and "p.jsonl:1" in proc.stderr and "prompt" in proc.stderr
    proc = rlmem("rollout", "--model", d / "model", "--prompts", bad_prompts, "--out", tmp_path / "o.jsonl",
                 "--delta", 4, "--window", 8, check=False)
    assert proc.returncode == 2 and "--delta" in proc.stderr and "--window" in proc.stderr
    proc = rlmem("rollout", "--model", d / "model", "--prompts", bad_prompts, "--out", tmp_path / "o.jsonl",
                 "--eps", 1.5, check=False)
    assert proc.returncode == 2 and "--eps" in proc.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text(out.read_text().splitlines()[0].replace('"logprobs"', '"logprobz"') + "\n")
    proc = rlmem("replay-check", broken, "--model", d / "model", check=False)
    assert proc.returncode == 2 and "broken.jsonl:1" in proc.stderr and "logprobs" in proc.stderr
    proc = rlmem("replay-check", out, "--model", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "tiny-model" in proc.stderr


def test_inspect_draws_what_was_evicted(rollout_files, tmp_path):
    d, out = rollout_files
    proc = rlmem("inspect", out, "--index", 1, "--out", tmp_path, "--tokenizer", d / "model")
    assert "layer 0 at the end" in proc.stdout
    for name in ("record1_evictions.png", "record1_replay_mask.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    proc = rlmem("inspect", out, "--index", 9, "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "--index 9" in proc.stderr


def test_rollout_help_shows_the_eviction_config_defaults():
    """One definition: every eviction flag's default is EvictionConfig()'s (docs/design.md section 1)."""
    from rlmem.eviction.policy import EvictionConfig

    help_text = " ".join(rlmem("rollout", "--help", check=False).stdout.split())
    for field in dataclasses.fields(EvictionConfig):
        flag = "--scorer-arg" if field.name == "scorer_args" else "--" + field.name.replace("_", "-")   # repeatable
        assert flag in help_text
        assert f"(default {getattr(EvictionConfig(), field.name)})" in help_text.split(flag + " ", 2)[-1].split(" --")[0]


def test_replay_check_generates_with_a_backend_then_checks(rollout_files, tmp_path):
    d, _ = rollout_files
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Using 3 5 7, make 22."}) + "\n")
    out = tmp_path / "made.jsonl"
    proc = rlmem("replay-check", out, "--prompts", prompts, "--backend", "torch", "--model", d / "model",
                 "--delta", 16, "--block-size", 4, "--window", 4, "--max-new-tokens", 50)
    assert "generated 1 records with backend torch" in proc.stdout and "OK" in proc.stdout
    assert json.loads(out.read_text())["eviction"]["rounds"]
    proc = rlmem("replay-check", "--model", d / "model", check=False)
    assert proc.returncode == 2 and "records file" in proc.stderr
    proc = rlmem("rollout", "--model", d / "model", "--prompts", prompts, "--out", out, "--backend", "nope", check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_a_setting_the_engine_refuses_is_one_error_line(rollout_files, tmp_path, monkeypatch):
    """A prompt plus max tokens beyond the model's positions: ``rollout`` refuses it from the
    model's config.json before the model loads; the engine's own check (at generate time) says so
    in one line too when it is reached. Exit 2, no traceback, nothing written."""
    d, _ = rollout_files
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    proc = rlmem("rollout", "--model", d / "model", "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                 "--max-new-tokens", 10**6, check=False)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == (
        f"error: --max-new-tokens 1000000: prompt 1 of {prompts} has 5 tokens, and 5 + 1000000 exceeds the model's "
        f"max_position_embeddings (4096, {d / 'model' / 'config.json'})\n")
    import rlmem.commands.rollout as rollout_cmd

    monkeypatch.setattr(rollout_cmd, "check_fits", lambda *a: None)   # the engine's own check
    proc = rlmem("rollout", "--model", d / "model", "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                 "--max-new-tokens", 10**6, check=False)
    assert proc.returncode == 2 and "--backend torch:" in proc.stderr and "max_position_embeddings" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.jsonl").exists()
    assert not list(tmp_path.glob(".o.jsonl.lock")) and not list(tmp_path.glob("*.tmp"))


def test_scorer_args_flag_sets_a_scorer_setting_and_names_a_bad_key(rollout_files, tmp_path):
    """--scorer-arg KEY=VALUE reaches the scorer (the record states it); an unknown key, a bad value
    or a malformed item is one error line naming the flag, the scorer and the key."""
    d, _ = rollout_files
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Using 3 5 7, make 22."}) + "\n")
    common = ["rollout", "--model", d / "model", "--prompts", prompts, "--out", tmp_path / "o.jsonl",
              "--delta", 16, "--block-size", 4, "--window", 4, "--max-new-tokens", 24, "--scorer", "streamingllm"]
    proc = rlmem(*common, "--scorer-arg", "bogus=1", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--scorer-arg: scorer 'streamingllm' has no setting 'bogus' (its settings: sinks)" in proc.stderr
    proc = rlmem(*common, "--scorer-arg", "sinks=many", check=False)
    assert proc.returncode == 2 and "setting 'sinks': expected an integer (got 'many')" in proc.stderr
    proc = rlmem(*common, "--scorer-arg", "sinks", check=False)
    assert proc.returncode == 2 and "--scorer-arg 'sinks': expected KEY=VALUE" in proc.stderr
    rlmem(*common, "--scorer-arg", "sinks=8")
    rec = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    assert rec["eviction"]["scorer"] == "streamingllm" and rec["eviction"]["scorer_args"] == {"sinks": 8}


def test_two_rollouts_into_one_out_and_ctrl_c_leave_it_whole(rollout_files, tmp_path, monkeypatch):
    """``--out`` is locked while a rollout writes it: a second one is refused naming the holder (it
    used to run, both writing ``out.tmp``). Ctrl-C, during generation or during the write, exits
    130 and leaves an existing ``--out`` as it was, with no lock or temporary file behind."""
    import os

    import rlmem.commands.rollout as rollout_cmd
    import rlmem.eviction.record as record_mod
    from rlmem.commands.common import lock_output_file

    d, _ = rollout_files
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} 5 7 : 22"}) + "\n" for i in range(3)))
    out = tmp_path / "o.jsonl"
    args = ["rollout", "--model", d / "model", "--prompts", prompts, "--out", out, "--max-new-tokens", 4,
            "--batch-size", 1]
    held = lock_output_file(out)                 # another rollout writing the same file
    try:
        proc = rlmem(*args, check=False)
    finally:
        held.release()
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith(f"error: --out {out}: ")
    assert proc.stderr.startswith(f"error: --out {out}: is in use by another process (pid {os.getpid()} on ")
    assert "choose another --out" in proc.stderr and not out.exists()

    out.write_text("earlier records\n")
    calls = []
    real_generate = rollout_cmd.generate

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(rollout_cmd, "generate", interrupted)
    proc = rlmem(*args, check=False)
    assert proc.returncode == 130 and proc.stderr.endswith(f"rlmem rollout: interrupted; {out} not written\n")
    assert out.read_text() == "earlier records\n" and sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "p.jsonl"]

    monkeypatch.setattr(rollout_cmd, "generate", real_generate)

    def torn_write(path, records, append=False):
        (tmp_path / "o.jsonl.tmp").write_text('{"prompt_ids": [1')
        raise KeyboardInterrupt

    monkeypatch.setattr(record_mod, "write_jsonl", torn_write)
    proc = rlmem(*args, check=False)
    assert proc.returncode == 130 and out.read_text() == "earlier records\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "p.jsonl"]


def test_a_negative_kept_index_is_named_as_such(rollout_files, tmp_path):
    """A negative kept block index was reported as a negative "token id" (issue 22, item 9)."""
    _, out = rollout_files
    rec = next(json.loads(l) for l in out.read_text().splitlines() if json.loads(l)["eviction"]["rounds"])
    rec["eviction"]["rounds"][0]["layers"][1]["kept"][0] = -2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n")
    proc = rlmem("inspect", bad, check=False)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: {bad}:1: eviction.rounds[0].layers[1].kept: must be >= 0 (got -2 at index 0)\n")
    rec["eviction"]["rounds"][0]["layers"][1]["kept"][0] = 0
    rec["prompt_ids"][2] = -7
    bad.write_text(json.dumps(rec) + "\n")
    proc = rlmem("inspect", bad, check=False)
    assert proc.stderr == f"error: {bad}:1: prompt_ids: must be >= 0 (got -7 at index 2)\n"

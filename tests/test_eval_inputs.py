"""``rlmem eval`` checks its inputs before it works, and an eval directory never mixes results.

Each test here failed before its fix (issue 22): a model changed under the same path, two evals
into one ``--out``, duplicate methods or rates, refusals that came after the model loaded or after
``eval_config.json`` was written, tracebacks instead of one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from rlmem.evaluation import fingerprint as fp
from rlmem.evaluation import runner
from rlmem.evaluation.runner import EvalError, EvalSettings, run_eval
from rlmem.models.hf_config import max_positions
from rlmem.evaluation.store import StoreError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _settings(model, tmp_path, out="ev", **kw):
    from rlmem.eviction.policy import EvictionConfig

    f = _jsonl(tmp_path / "cd.jsonl", [{"target": 10 + i, "numbers": [2, 5, i + 1]} for i in range(2)])
    base = dict(model=str(model), task=f"jsonl:{f}", out=str(tmp_path / out), methods=["full", "ngc"], eps=[0.5],
                n=1, max_new_tokens=6, schedule=EvictionConfig(delta=16, block_size=4, window=4), batch_size=4,
                temperature=1.0, top_p=1.0)
    base.update(kw)
    return EvalSettings(**base)


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if an engine (and so the model's weights, or vLLM) is ever built."""
    def refuse(s):
        raise AssertionError(f"an engine was built for {s.model} ({s.backend})")

    monkeypatch.setattr(runner, "make_engine", refuse)


def _cli(argv, capsys):
    from rlmem.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------ 1. the model's identity
def test_a_changed_model_at_the_same_path_is_refused_and_a_relative_path_is_the_same(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    from rlmem.models.tiny import make_tiny_model

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    first = run_eval(_settings(model, tmp_path), progress=False)
    cfg = json.loads((tmp_path / "ev" / "eval_config.json").read_text())
    assert cfg["model"] == str(model.resolve())
    w = cfg["model_files"]["model.safetensors"]
    assert w["size"] == (model / "model.safetensors").stat().st_size and w["hash"] == "full" and len(w["sha256"]) == 64
    assert {"config.json", "tokenizer.json"} <= set(cfg["model_files"])
    # the same folder named relatively is the same setting: it resumes (nothing left to do)
    monkeypatch.chdir(tmp_path)
    assert run_eval(_settings("m", tmp_path), progress=False) == first
    # new weights in the same folder: another model; resuming into the old results is refused
    make_tiny_model(model, layers=2, hidden=256, seed=1)
    with pytest.raises(StoreError, match=r"model_files\.model\.safetensors\.sha256: [0-9a-f]{12}… there, "
                                         r"[0-9a-f]{12}… now") as e:
        run_eval(_settings("m", tmp_path, methods=["full", "ngc", "h2o"]), progress=False)
    assert "use a new --out" in str(e.value)
    assert not (tmp_path / "ev" / "records" / "h2o_eps0.5.jsonl").exists()


def test_large_files_are_fingerprinted_by_size_and_sampled_chunks(tmp_path, monkeypatch):
    """Above FULL_HASH_BYTES, the head, tail and evenly spaced chunks are hashed (the documented rule)."""
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(fp, "EDGE_BYTES", 256)
    monkeypatch.setattr(fp, "CHUNK_BYTES", 64)
    monkeypatch.setattr(fp, "SAMPLES", 2)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    data = bytearray(os.urandom(10_000))
    (d / "w.bin").write_bytes(data)
    (d / ".cache").mkdir()
    (d / ".cache" / "x").write_text("ignored")
    base = fp.model_fingerprint(str(d))
    assert sorted(base) == ["config.json", "w.bin"]
    assert base["w.bin"]["hash"] == "sampled" and base["config.json"]["hash"] == "full"
    # step = (10000 - 512) // 3 = 3162: chunks at 256+3162 and 256+6324, 64 bytes each
    for offset, seen in ((10, True), (9_990, True), (256 + 3162 + 5, True), (5_000, False)):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        (d / "w.bin").write_bytes(changed)
        assert (fp.model_fingerprint(str(d))["w.bin"] != base["w.bin"]) is seen, offset
    (d / "w.bin").write_bytes(bytes(data) + b"\0")
    assert fp.model_fingerprint(str(d))["w.bin"]["size"] == 10_001


# ------------------------------------------------------------------ 2. the lock
def test_a_second_eval_into_the_same_out_is_refused_naming_the_holder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    code = ("import sys, time; from rlmem.dirlock import DirLock; "
            "DirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"in use by another eval \\(pid {holder.pid} on "
                                             f"{socket.gethostname()}, started .*choose another --out"):
            run_eval(_settings(tiny_model_dir, tmp_path), progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".rlmem.lock"]   # the refused one wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9) without releasing: its lock is stale and is taken over
    assert json.loads((out / ".rlmem.lock").read_text())["pid"] == holder.pid
    rows = run_eval(_settings(tiny_model_dir, tmp_path), progress=False)
    assert [r["method"] for r in rows] == ["full", "ngc"]
    assert f"note: took over a stale lock (pid {holder.pid} on {socket.gethostname()}" in capsys.readouterr().out
    assert not (out / ".rlmem.lock").exists()   # released at the end


# ------------------------------------------------------------------ 3. duplicates
@pytest.mark.parametrize("kw, msg", [
    ({"methods": ["ngc", "ngc", "full"]}, "--methods: 'ngc' is given twice"),
    ({"eps": [0.5, 0.5]}, "--eps: 0.5 is given twice"),
    ({"eps": [0.5, 0.5000001]}, r"--eps: 0.5000001 and 0.5 name the same run \(eps0.5\)"),
])
def test_duplicate_methods_and_rates_are_refused(tiny_model_dir, tmp_path, no_engine, kw, msg):
    with pytest.raises(EvalError, match=msg):
        run_eval(_settings(tiny_model_dir, tmp_path, **kw), progress=False)
    assert not (tmp_path / "ev").exists()


# ------------------------------------------------------------------ 4-7. refused before anything
@pytest.mark.parametrize("kw, msg", [
    ({"backend": "vllm", "schedule_kw": {"block_size": 16}},
     "ngc at eps=0.5: eviction.block_size=16: the vLLM engine .* multiple of 32"),
    ({"backend": "vllm", "methods": ["full", "h2o"], "schedule_kw": {"block_size": 32}},
     "h2o at eps=0.5: method 'h2o' observes every decoding step"),
    ({"backend": "vllm", "schedule_kw": {"block_size": 32, "protect_recent": 0}},
     "protect_recent=0 is not supported by the vLLM engine"),
])
def test_vllm_refusals_come_before_any_engine_starts(tiny_model_dir, tmp_path, monkeypatch, no_engine, kw, msg):
    from rlmem.eviction.policy import EvictionConfig

    from rlmem.engine import registry

    monkeypatch.setattr(registry, "engine_unavailable_reason", lambda name: None)   # as where vLLM runs
    sched = EvictionConfig(**{"delta": 64, "block_size": 16, "window": 4, **kw.pop("schedule_kw")})
    with pytest.raises(EvalError, match=msg):
        run_eval(_settings(tiny_model_dir, tmp_path, schedule=sched, **kw), progress=False)
    assert not (tmp_path / "ev").exists()


def test_a_prompt_beyond_the_context_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, no_engine):
    f = _jsonl(tmp_path / "long.jsonl", [{"prompt": "hi", "answer": "1"}, {"prompt": "word " * 5000, "answer": "1"}])
    with pytest.raises(EvalError, match=r"problem 1 \(long.jsonl-1\): prompt of \d+ tokens \+ --max-new-tokens 6 "
                                        r"exceeds the model's max_position_embeddings \(4096\)"):
        run_eval(_settings(tiny_model_dir, tmp_path, task=f"jsonl:{f}"), progress=False)
    assert not (tmp_path / "ev").exists()
    # the limit is prompt + new tokens: a short prompt with too many new tokens is refused too
    with pytest.raises(EvalError, match=r"problem 0 .*--max-new-tokens 4095 exceeds"):
        run_eval(_settings(tiny_model_dir, tmp_path, max_new_tokens=4095), progress=False)
    assert max_positions(str(tiny_model_dir)) == 4096


def test_refused_sampling_leaves_no_eval_config_so_the_corrected_command_runs(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    orig = runner.make_engine
    monkeypatch.setattr(runner, "make_engine", lambda s: calls.append(1) or orig(s))
    for kw, msg in (({"top_p": 0.0}, "top_p: must be in"), ({"top_k": -1}, "top_k: must be an integer >= 0")):
        with pytest.raises(EvalError, match=msg):
            run_eval(_settings(tiny_model_dir, tmp_path, **kw), progress=False)
        assert not (tmp_path / "ev").exists() and calls == []
    assert [r["method"] for r in run_eval(_settings(tiny_model_dir, tmp_path), progress=False)] == ["full", "ngc"]


# ------------------------------------------------------------------ 8-9. one error line, exit 2
def _argv(model, tmp_path, *extra, task=None, out="cli"):
    task = task or f"jsonl:{_jsonl(tmp_path / 'm.jsonl', [{'prompt': 'What is 1+1?', 'answer': '2'}])}"
    return ["eval", "--model", str(model), "--task", task, "--n", "1", "--max-new-tokens", "4", "--delta", "16",
            "--block-size", "4", "--window", "4", "--out", str(tmp_path / out), "--no-progress", *extra]


def test_cli_bad_inputs_give_one_error_line(tiny_model_dir, tmp_path, capsys, no_engine):
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "\xff", "answer": "2"}\n')
    cases = [
        (_argv(tiny_model_dir, tmp_path, out="afile"), f"error: --out {tmp_path / 'afile'}: exists and is not a "
                                                       "directory"),
        (_argv(tiny_model_dir, tmp_path, out="afile/sub"),
         f"error: --out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a directory"),
        (_argv(tiny_model_dir, tmp_path, task=f"jsonl:{bad}"), f"error: {bad}:2: not UTF-8 text (byte 0xff"),
        (_argv(tiny_model_dir, tmp_path, "--task-option", "filler_repetas=3", task="passkey"),
         "error: --task-option filler_repetas: not an option of task 'passkey'; known: num_examples, "
         "filler_repeats, write_items"),
        (_argv(tiny_model_dir, tmp_path, "--task-option", "x=1", task="amc23"),
         "error: --task-option x: not an option of task 'amc23'; it takes none"),
        (_argv(tiny_model_dir, tmp_path, "--methods", "ngc,full,ngc"), "error: --methods: 'ngc' is given twice"),
        (_argv(tiny_model_dir, tmp_path, "--eps", "0.5", "0.5"), "error: --eps: 0.5 is given twice"),
        (_argv(tmp_path / "nomodel", tmp_path), f"error: --model {tmp_path / 'nomodel'}: no such directory"),
        (_argv(tiny_model_dir, tmp_path, task=f"jsonl:{tmp_path}"),
         f"error: --task jsonl:{tmp_path}: is a directory, not a JSON-lines file"),
        (_argv(tiny_model_dir, tmp_path, out=str(tiny_model_dir / "ev")),
         f"error: --out {tiny_model_dir / 'ev'}: inside the --model folder {tiny_model_dir}"),
    ]
    for argv, msg in cases:
        rc, out, err = _cli(argv, capsys)
        assert rc == 2 and err.startswith(msg) and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "cli").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_is_one_line(tiny_model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = _cli(_argv(tiny_model_dir, tmp_path, out="ro/ev"), capsys)
    finally:
        ro.chmod(0o700)
    assert rc == 2 and err.startswith(f"error: --out {ro / 'ev'}: cannot write") and "Permission denied" in err


# ------------------------------------------------------------------ a damaged directory
def test_a_deleted_or_cut_records_file_redoes_its_run_exactly(tiny_model_dir, tmp_path, capsys):
    s = _settings(tiny_model_dir, tmp_path, n=2, batch_size=2)
    ref = run_eval(s, progress=False)
    rec = tmp_path / "ev" / "records"
    ref_lines = (rec / "ngc_eps0.5.jsonl").read_text()
    (rec / "ngc_eps0.5.jsonl").unlink()
    assert run_eval(s, progress=False) == ref
    assert f"note: {rec / 'ngc_eps0.5.jsonl'} is missing: run ngc_eps0.5 is redone (2 cells)" in capsys.readouterr().out
    assert (rec / "ngc_eps0.5.jsonl").read_text() == ref_lines
    # one record cut short (a hand edit): the run is redone, the other runs are kept
    lines = (rec / "full.jsonl").read_text().splitlines(keepends=True)
    (rec / "full.jsonl").write_text("".join(lines[:1] + [lines[1][:30] + "\n"] + lines[2:]))
    assert run_eval(s, progress=False) == ref
    assert "full.jsonl lacks 1 records of finished cells: run full is redone (2 cells)" in capsys.readouterr().out
    assert (rec / "ngc_eps0.5.jsonl").read_text() == ref_lines


def test_a_corrupted_index_line_redoes_its_run_exactly(tiny_model_dir, tmp_path, capsys):
    s = _settings(tiny_model_dir, tmp_path)
    ref = run_eval(s, progress=False)
    index = tmp_path / "ev" / "cells.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    assert [json.loads(l)["method"] for l in lines] == ["full", "full", "ngc", "ngc"]
    index.write_text(lines[0] + "{not json\n" + "".join(lines[2:]))
    capsys.readouterr()
    assert run_eval(s, progress=False) == ref
    assert f"note: {index}: line 2 is not a cell: run full is redone (1 cell)" in capsys.readouterr().out
    assert sorted(index.read_text().splitlines()) == sorted(l.rstrip("\n") for l in lines)
    # a line that is JSON but not a cell is refused, naming the file and line
    index.write_text(lines[0] + '{"x": 1}\n' + "".join(lines[1:]))
    with pytest.raises(StoreError, match=f"{index}:2: a line is not a cell"):
        run_eval(s, progress=False)
    assert not (tmp_path / "ev" / ".rlmem.lock").exists()   # a refusal releases the lock


def test_a_run_that_failed_before_its_first_cell_does_not_block_the_corrected_command(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    """A failure after eval_config.json is written (weights that do not load) leaves no cell:
    the corrected command, with other settings, takes the directory instead of being refused."""
    def broken(s):
        raise EvalError(f"--model {s.model}: weights do not load")

    monkeypatch.setattr(runner, "make_engine", broken)
    with pytest.raises(EvalError, match="weights do not load"):
        run_eval(_settings(tiny_model_dir, tmp_path, max_new_tokens=5), progress=False)
    assert (tmp_path / "ev" / "eval_config.json").is_file()
    monkeypatch.undo()
    assert [r["method"] for r in run_eval(_settings(tiny_model_dir, tmp_path), progress=False)] == ["full", "ngc"]
    assert "no finished cells; its settings are replaced (max_new_tokens: 5 there, 6 now)" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "eval_config.json").read_text())["max_new_tokens"] == 6
    # with finished cells, other settings are refused as before
    with pytest.raises(StoreError, match="max_new_tokens: 6 there, 5 now"):
        run_eval(_settings(tiny_model_dir, tmp_path, max_new_tokens=5), progress=False)

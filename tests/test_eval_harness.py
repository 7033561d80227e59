"""``rlmem eval``: tasks and grading, pass@k and peak-KV summaries, outputs, resumability."""

from __future__ import annotations

import json
import math

import pytest

from rlmem.evaluation.results import pass_ks, results_markdown, summarize_run
from rlmem.evaluation.runner import EvalError, EvalSettings, run_eval
from rlmem.evaluation.store import Cell, EvalStore, StoreError
from rlmem.evaluation.tasks import TaskError, grade, load_task, read_task_file


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ tasks and grading
def test_jsonl_task_rows_and_grading(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [
        {"prompt": "What is 2+3?", "answer": "5"},
        {"messages": [{"role": "user", "content": "Say 7"}], "answer": 7},
        {"target": 10, "numbers": [2, 5, 3]},
        {"prompt": "Find the key 12345.", "answer": "12345", "reward": "passkey"},
    ])
    ex = read_task_file(str(f))
    assert [e["reward"] for e in ex] == ["math", "math", "countdown", "passkey"]
    assert "10" in ex[2]["prompt"] and ex[2]["numbers"] == [2, 5, 3]
    got = grade(ex, ["\\boxed{5}", "\\boxed{8}", "<answer>2 * 5 + 3 - 3</answer>", "It is 12345."],
                ["p"] * 4)
    # countdown: every number exactly once -> "2 * 5 + 3 - 3" uses 3 twice: wrong
    assert got == [1.0, 0.0, 0.0, 1.0]
    assert grade(ex[2:3], ["<answer>(5 + 2 + 3)</answer>"], ["p"]) == [1.0]


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "x"}, "expected 'answer'"),
    ({"answer": "1"}, "expected a text field 'prompt'"),
    ({"prompt": "x", "answer": ""}, "answer is empty"),
    ({"target": "ten", "numbers": [1, 2]}, "target must be an integer"),
    ({"prompt": "x", "answer": "1", "reward": "nope"}, "not a registered verifier"),
    ({"messages": [{"role": "user"}], "answer": "1"}, "messages"),
])
def test_bad_task_rows_name_file_line_and_field(tmp_path, row, msg):
    f = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, row])
    with pytest.raises(TaskError, match=msg) as e:
        read_task_file(str(f))
    assert "bad.jsonl:2" in str(e.value)


def test_registered_tasks_load_offline():
    t = load_task("countdown", limit=3, seed=0)
    assert len(t.examples) == 3 and all(e["reward"] == "countdown" for e in t.examples)
    assert load_task("passkey", limit=2).examples[0]["reward"] == "passkey"
    with pytest.raises(TaskError, match="unknown dataset"):
        load_task("nope")
    with pytest.raises(TaskError, match="file not found"):
        load_task("jsonl:/nonexistent.jsonl")


# ------------------------------------------------------------------ metrics
def _cell(method, eps, problem, scores, lens, peaks, prompt_len=10):
    return Cell(method, eps, problem, prompt_len, scores, lens, peaks)


def test_pass_at_k_and_standard_errors_by_hand():
    assert pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4] and pass_ks(1) == [1]
    full = [_cell("full", 0.0, i, [1, 1, 1, 1], [5, 5, 7, 9], [14, 14, 16, 18]) for i in range(3)]
    cells = [_cell("ngc", 0.5, 0, [1, 1, 1, 1], [5] * 4, [7] * 4),
             _cell("ngc", 0.5, 1, [1, 0, 1, 0], [5] * 4, [14] * 4),
             _cell("ngc", 0.5, 2, [0, 0, 0, 0.5], [5] * 4, [2] * 4)]
    r = summarize_run("ngc", 0.5, cells, full)
    # per problem pass@1 = c/n = [1, .5, 0]; pass@2 = 1 - C(n-c,2)/C(4,2) = [1, 5/6, 0]; pass@4 = [1, 1, 0]
    for k, per in ((1, [1, 0.5, 0]), (2, [1, 5 / 6, 0]), (4, [1, 1, 0])):
        mean = sum(per) / 3
        se = math.sqrt(sum((v - mean) ** 2 for v in per) / 2 / 3)
        assert r[f"pass@{k}"] == pytest.approx(mean, abs=1e-12)
        assert r[f"pass@{k}_stderr"] == pytest.approx(se, abs=1e-12)
    assert r["accuracy"] == pytest.approx(6 / 12)
    # sample j paired with full's sample j: full peaks p + c_base - 1 = [14, 14, 16, 18]
    ratios = [b / m for m in (7, 14, 2) for b in (14, 14, 16, 18)]
    assert r["peak_kv_reduction"] == pytest.approx(sum(ratios) / 12)
    assert summarize_run("full", 0.0, full, full)["peak_kv_reduction"] == 1.0
    md = results_markdown([summarize_run("full", 0.0, full, full), r])
    assert "| ngc | 0.5 | 0.500 ± 0.289 | 0.611 ± 0.309 | 0.667 ± 0.333 |" in md


def test_reduction_matches_the_schedule_on_long_generations(tiny_model_dir):
    """ε = 0.5, EOS off: the measured reduction equals the schedule's prediction for those lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.policy import EvictionConfig
    from rlmem.eviction.record import peak_kv
    from rlmem.metrics import peak_no_eviction, schedule_peak

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eng = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    prompts = [tok("Using 3 5 7, make 22.").input_ids, tok("Hi").input_ids]
    cfg = EvictionConfig(delta=32, eps=0.5, block_size=8, window=4)
    sp = SamplingParams(max_new_tokens=300, seed=1)
    full = eng.generate(prompts, sp, None)
    ngc = eng.generate(prompts, sp, cfg, greedy_evictions=True)
    fc = [_cell("full", 0.0, i, [0.0], [len(r.completion_ids)], [peak_kv(r)], len(r.prompt_ids)) for i, r in enumerate(full)]
    nc = [_cell("ngc", 0.5, i, [0.0], [len(r.completion_ids)], [peak_kv(r)], len(r.prompt_ids)) for i, r in enumerate(ngc)]
    got = summarize_run("ngc", 0.5, nc, fc)["peak_kv_reduction"]
    pred = sum(peak_no_eviction(len(p), 300) / schedule_peak(len(p), 300, cfg) for p in prompts) / 2
    assert got == pytest.approx(pred, rel=1e-12)
    assert 2.5 < got < 5.5   # steady state δ/ε = 64 entries against ~310


# ------------------------------------------------------------------ the harness end to end
def _settings(tiny_model_dir, tmp_path, out="ev", **kw):
    from rlmem.eviction.policy import EvictionConfig

    f = _jsonl(tmp_path / "cd.jsonl", [{"target": 10 + i, "numbers": [2, 5, i + 1]} for i in range(5)])
    base = dict(model=str(tiny_model_dir), task=f"jsonl:{f}", out=str(tmp_path / out), methods=["full", "ngc"],
                eps=[0.5], n=2, max_new_tokens=40, schedule=EvictionConfig(delta=16, block_size=4, window=4),
                batch_size=4, temperature=1.0, top_p=1.0)
    base.update(kw)
    return EvalSettings(**base)


def _count_generate(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Wrap the engine's generate: count sequences per call; raise KeyboardInterrupt at call ``fail_at``."""
    from rlmem.engine.reference import ReferenceEngine

    calls: list[int] = []
    orig = ReferenceEngine.generate

    def wrapped(self, prompts, *a, **kw):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return orig(self, prompts, *a, **kw)

    monkeypatch.setattr(ReferenceEngine, "generate", wrapped)
    return calls


def test_eval_outputs_records_replay_and_plots(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlmem.commands.replay_check import check_records
    from rlmem.eviction.record import read_jsonl

    s = _settings(tiny_model_dir, tmp_path)
    results = run_eval(s, progress=False)
    out = tmp_path / "ev"
    data = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["eps"]) for r in data["results"]] == [("full", 0.0), ("ngc", 0.5)]
    full, ngc = data["results"]
    assert full["peak_kv_reduction"] == 1.0 and ngc["peak_kv_reduction"] > 1.0
    assert {"pass@1", "pass@1_stderr", "pass@2", "pass@2_stderr", "completion_length_mean"} <= set(ngc)
    assert "pass@4" not in ngc and results == data["results"]
    for run in ("full", "ngc_eps0.5"):
        recs = read_jsonl(out / "records" / f"{run}.jsonl")
        assert sorted((r.extra["problem_index"], r.extra["sample_index"]) for r in recs) == \
            [(p, j) for p in range(5) for j in range(2)]
        assert all(r.reward in (0.0, 1.0) for r in recs)
    recs = read_jsonl(out / "records" / "ngc_eps0.5.jsonl")
    assert sum(r.num_rounds for r in recs) > 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    worst = check_records(model, recs, progress=False)
    assert worst["token"] < 1e-4 and worst["eviction"] < 1e-4
    md = (out / "results.md").read_text()
    assert "| full | 0 |" in md and "| ngc | 0.5 |" in md
    for png in ("accuracy_vs_reduction.png", "pass_at_k.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000


def test_interoception_tags_each_eviction_run_with_its_rate(tiny_model_dir, tmp_path):
    """A model trained with interoception is evaluated the way it was trained: ε in the prompt."""
    from transformers import AutoTokenizer

    from rlmem.eviction.record import read_jsonl

    s = _settings(tiny_model_dir, tmp_path, eps=[0.25, 0.5], interoception=True, n=1, max_new_tokens=8)
    run_eval(s, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = {run: {tok.decode(r.prompt_ids) for r in read_jsonl(tmp_path / "ev" / "records" / f"{run}.jsonl")}
             for run in ("full", "ngc_eps0.25", "ngc_eps0.5")}
    assert not any("eviction_rate" in t for t in texts["full"])
    assert all("<eviction_rate>25%</eviction_rate>" in t.replace(" ", "") for t in texts["ngc_eps0.25"])
    assert all("<eviction_rate>50%</eviction_rate>" in t.replace(" ", "") for t in texts["ngc_eps0.5"])
    # the same tagged prompts are a different eval: resuming without the flag is refused
    with pytest.raises(StoreError, match="interoception"):
        run_eval(_settings(tiny_model_dir, tmp_path, eps=[0.25, 0.5], n=1, max_new_tokens=8), progress=False)


def test_interrupted_eval_resumes_without_redoing_cells(tiny_model_dir, tmp_path, monkeypatch):
    ref = run_eval(_settings(tiny_model_dir, tmp_path, out="ref"), progress=False)

    # 5 problems, batch 4 / n 2 -> chunks of 2 problems: [0,1] [2,3] [4] per run; 6 calls in all
    calls = _count_generate(monkeypatch, fail_at=4)
    s = _settings(tiny_model_dir, tmp_path, out="cut")
    with pytest.raises(KeyboardInterrupt):
        run_eval(s, progress=False)
    assert calls == [4, 4, 2, 4]      # full done, first ngc chunk done, interrupted on the second
    from rlmem.evaluation.fingerprint import model_fingerprint

    store = EvalStore(s.out)
    assert store.open({**s.fingerprint(), "model_files": model_fingerprint(s.model)}) == 5 + 2
    store.close()   # the directory's lock: held while open, as a running eval holds it
    # a crash between the records append and the index append: orphan records and a torn line
    with open(store.records_path("ngc_eps0.5"), "a") as f:
        f.write(json.dumps({"problem_index": 2, "sample_index": 0}) + "\n" + '{"prompt_ids": [1, 2')
    monkeypatch.undo()
    calls = _count_generate(monkeypatch)
    got = run_eval(s, progress=False)
    assert calls == [4, 2]            # only the unfinished ngc chunks
    assert got == ref                 # identical to the uninterrupted run (seeds per chunk)
    lines = store.records_path("ngc_eps0.5").read_text().splitlines()
    assert len(lines) == 10 and len({(json.loads(l)["problem_index"], json.loads(l)["sample_index"]) for l in lines}) == 10
    # nothing left to do: a rerun generates nothing; adding a method runs only that one
    calls.clear()
    assert run_eval(s, progress=False) == ref and calls == []
    more = _settings(tiny_model_dir, tmp_path, out="cut", methods=["h2o"], eps=[0.5, 0.25])
    got = run_eval(more, progress=False)
    assert calls == [4, 4, 2, 4, 4, 2]   # h2o at 0.5 and 0.25 only; full and ngc come from the store
    # the results files describe the whole directory, not only the last command's methods
    data = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert [(r["method"], r["eps"]) for r in data["results"]] == \
        [("full", 0.0), ("h2o", 0.5), ("h2o", 0.25), ("ngc", 0.5)]
    assert data["results"] == got and got[0] == ref[0] and got[3] == ref[1]
    assert data["settings"]["methods"] == ["full", "h2o", "ngc"] and data["settings"]["eps"] == [0.25, 0.5]
    assert "| ngc | 0.5 |" in (tmp_path / "cut" / "results.md").read_text()


def test_resume_refuses_other_settings_and_bad_options(tiny_model_dir, tmp_path):
    s = _settings(tiny_model_dir, tmp_path, limit=1, n=1)
    run_eval(s, progress=False)
    with pytest.raises(StoreError, match="max_new_tokens: 40 there, 41 now"):
        run_eval(_settings(tiny_model_dir, tmp_path, limit=1, n=1, max_new_tokens=41), progress=False)
    # a directory from before --tau, --score-transform, --stop and --reward existed resumes at their
    # defaults, and is refused with another value
    from rlmem.eviction.policy import EvictionConfig

    cfg_file = tmp_path / "ev" / "eval_config.json"
    old = {k: v for k, v in json.loads(cfg_file.read_text()).items()
           if k not in ("tau", "score_transform", "stop", "reward", "reward_kwargs")}
    cfg_file.write_text(json.dumps(old))
    assert run_eval(s, progress=False)[0]["problems"] == 1
    with pytest.raises(StoreError, match="tau: 1.0 there, 0.5 now"):
        run_eval(_settings(tiny_model_dir, tmp_path, limit=1, n=1,
                           schedule=EvictionConfig(delta=16, block_size=4, window=4, tau=0.5)), progress=False)
    with pytest.raises(EvalError, match="unknown method 'bogus'"):
        run_eval(_settings(tiny_model_dir, tmp_path, methods=["bogus"]), progress=False)
    with pytest.raises(EvalError, match="--eps"):
        run_eval(_settings(tiny_model_dir, tmp_path, eps=[1.5]), progress=False)
    with pytest.raises(EvalError, match="no config.json"):
        run_eval(_settings(tmp_path, tmp_path, out="x"), progress=False)


def test_cli_eval(tiny_model_dir, tmp_path, capsys):
    from rlmem.cli import main

    f = _jsonl(tmp_path / "m.jsonl", [{"prompt": "What is 1+1?", "answer": "2"}])
    out = tmp_path / "cli"
    argv = ["eval", "--model", str(tiny_model_dir), "--task", f"jsonl:{f}", "--methods", "full,ngc", "--eps", "0.5",
            "0.75", "--delta", "16", "--block-size", "4", "--window", "4", "--n", "2", "--max-new-tokens", "24",
            "--seed", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| ngc | 0.75 |" in text and (out / "records" / "ngc_eps0.75.jsonl").is_file()
    assert main(argv[:5] + ["--methods", "full,snap"] + argv[7:]) == 2
    assert "error: --methods: unknown method 'snap'" in capsys.readouterr().err
    assert main(argv + ["--threads", "0"]) == 2
    assert "error: --threads: must be >= 1 (got 0)" in capsys.readouterr().err


def test_baseline_eval_records_pass_replay_check_on_tokens(tiny_model_dir, tmp_path, capsys):
    from rlmem.cli import main

    s = _settings(tiny_model_dir, tmp_path, methods=["full", "snapkv", "h2o"], limit=2, n=1)
    res = run_eval(s, progress=False)
    assert [r["method"] for r in res] == ["full", "snapkv", "h2o"]
    assert all(r["peak_kv_reduction"] > 1.0 for r in res[1:])
    capsys.readouterr()
    for run in ("snapkv_eps0.5", "h2o_eps0.5"):
        path = tmp_path / "ev" / "records" / f"{run}.jsonl"
        assert json.loads(path.read_text().splitlines()[0])["eviction"]["scorer"] == run.split("_")[0]
        assert main(["replay-check", str(path), "--model", str(tiny_model_dir)]) == 0
        out = capsys.readouterr().out
        assert "OK" in out and "heuristic scorers" in out


def test_bench_rollout_times_baseline_scorers_against_ngc(tiny_model_dir, capsys):
    from rlmem.cli import main

    assert main(["bench", "rollout", "--model", str(tiny_model_dir), "--batch", "2", "--new-tokens", "40",
                 "--delta", "16", "--block-size", "4", "--window", "4", "--scorers", "snapkv,streamingllm",
                 "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {l.split()[2]: l for l in lines if l.strip().startswith("40 engine")}
    assert set(rows) == {"full", "NGC", "snapkv", "streamingllm"}
    assert " 1.00x" in rows["NGC"].split("x")[2] + "x"      # NGC against itself
    assert main(["bench", "rollout", "--model", str(tiny_model_dir), "--scorers", "nope"]) == 2
    assert "unknown scorer 'nope'" in capsys.readouterr().err

"""Periodic evaluation: pass@k per ε, peak-KV reduction against the full cache, the picture."""

from __future__ import annotations

import json
import math

import pytest

from train_helpers import tiny_run_config

EVAL = {"source": "countdown-generated", "split": "test", "limit": 2, "num_samples": 2, "k": [1, 2],
        "eps": [0.5], "max_new_tokens": 16, "temperature": 1.0}

GRADED: list[dict] = []   # what graded_reward saw and returned, one entry per call (= per ε)


def graded_reward(completions, target=None, reward_scale=1.0, **_) -> list[float]:
    """A verifier we control: correct iff the completion text has an even length (mixes 0 and 1 on
    random text). Records its inputs and grades so tests can recompute pass@k by hand."""
    out = [reward_scale if len(c) % 2 == 0 else 0.0 for c in completions]
    GRADED.append({"completions": list(completions), "target": list(target), "rewards": out})
    return out


def _hand_pass_at_k(rewards: list[float], n: int, k: int) -> tuple[float, float]:
    """pass@k = 1 - C(n-c, k)/C(n, k) per problem (rows are problem-major), mean and std(ddof=1)/sqrt(m)."""
    per = [1.0 - math.comb(n - c, k) / math.comb(n, k)
           for c in (sum(r >= 1.0 for r in rewards[i:i + n]) for i in range(0, len(rewards), n))]
    mean = sum(per) / len(per)
    se = math.sqrt(sum((v - mean) ** 2 for v in per) / (len(per) - 1) / len(per))
    return mean, se


def _eval_run(cfg, examples, tok, workers):
    """The driver's evaluation step (rlmem.train.driver.evaluate_if_due) at the run's last step,
    with ``workers`` as the rollout workers: its result rows and the metrics it adds."""
    from types import SimpleNamespace

    from rlmem.train.driver import Run, evaluate_if_due

    run = Run(cfg, tok, [], examples, SimpleNamespace(rollout=workers), logger=None, num_layers=2, last_ckpt=None)
    metrics: dict = {}
    rows = evaluate_if_due(run, cfg.trainer.total_steps, metrics)
    return rows, metrics


def test_in_training_eval_and_rlmem_eval_give_the_same_rows(tiny_model_dir, tmp_path):
    """The same checkpoint, settings and seed: the driver's evaluation step (through its worker
    executor, a rollout worker in-process) and ``rlmem eval`` (its own flags, a local engine) give
    the same rows, numbers and records alike: both are rlmem/evaluation's pipeline."""
    from transformers import AutoTokenizer

    from rlmem.cli import main
    from rlmem.run.preflight import Prepared, load_data
    from rlmem.train.actors import RolloutWorker

    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", "trainer.total_steps=1",
                          eval={**EVAL, "limit": 3, "batch_size": 4, "max_new_tokens": 20},
                          data={"reward": "test_evaluation:graded_reward", "reward_kwargs": {"reward_scale": 1.0}})
    assert cfg.eval.top_p == 0.95 and cfg.eval.top_k == 0   # evaluation's defaults, the same ones rlmem eval has
    prepared = Prepared()
    assert load_data(cfg, prepared) == []
    examples = prepared.eval_examples
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows, metrics = _eval_run(cfg, examples, tok, [RolloutWorker(str(tiny_model_dir), dtype="float32", seed=cfg.seed)])

    task = tmp_path / "problems.jsonl"
    task.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", f"jsonl:{task}", "--methods", "ngc", "--eps", "0.5",
                 "--delta", "8", "--block-size", "4", "--window", "4", "--n", "2", "--max-new-tokens", "20",
                 "--temperature", "1.0", "--batch-size", "4", "--seed", str(cfg.seed),
                 "--reward", "test_evaluation:graded_reward", "--reward-option", "reward_scale=1.0",
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["method"], r["eps"]) for r in rows] == [("full", 0.0), ("ngc", 0.5)]
    assert rows == results
    assert {"pass@1", "pass@2", "peak_kv_reduction", "completion_length_mean"} <= set(rows[1])
    assert rows[1]["peak_kv_reduction"] > 1.0 and rows[0]["peak_kv_reduction"] == 1.0
    assert any(0 < r["accuracy"] < 1 for r in rows), "the verifier should mix grades (test precondition)"
    assert metrics["eval/eps_0.5/pass@1"] == rows[1]["pass@1"] and "eval/eps_0.5/method" not in metrics
    assert metrics["time/eval"] > 0
    # a setting that differs gives another row: the equality is not vacuous
    other = tmp_path / "ev-seed1"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", f"jsonl:{task}", "--methods", "ngc", "--eps", "0.5",
                 "--delta", "8", "--block-size", "4", "--window", "4", "--n", "2", "--max-new-tokens", "20",
                 "--temperature", "1.0", "--batch-size", "4", "--seed", "1",
                 "--reward", "test_evaluation:graded_reward", "--out", str(other), "--no-progress"]) == 0
    assert json.loads((other / "results.json").read_text())["results"] != results


@pytest.mark.slow
def test_ray_workers_grade_with_the_verifier_and_measure_peak_kv(tiny_model_dir, tmp_path):
    """The real executor: three Ray rollout workers share the jobs, and the rows equal one
    in-process worker's (a job's records do not depend on the worker that ran it)."""
    ray = pytest.importorskip("ray")
    from transformers import AutoTokenizer

    from rlmem.evaluation.tasks import prompt_text
    from rlmem.metrics import peak_no_eviction, schedule_peak
    from rlmem.run.preflight import Prepared, load_data
    from rlmem.train.actors import RolloutWorker, remote_class

    # shaping that would make every sample "correct" if it leaked into the score; batch_size 2 with
    # n = 2: one problem per job, 4 jobs for 3 workers
    cfg = tiny_run_config(tiny_model_dir, tmp_path, "trainer.total_steps=1", eval={**EVAL, "batch_size": 2},
                          data={"reward": "test_evaluation:graded_reward", "reward_kwargs": {"reward_scale": 1.0},
                                "shaping": [{"name": "train_helpers:always_correct", "weight": 5.0}]})
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prepared = Prepared()
    load_data(cfg, prepared)
    examples = prepared.eval_examples
    assert len(examples) == 2 and all(ex["id"].startswith("countdown-gen-test-") for ex in examples)
    GRADED.clear()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="error")
    try:
        workers = [remote_class(RolloutWorker).options(num_cpus=0.25).remote(str(tiny_model_dir), index=i)
                   for i in range(3)]
        results, _ = _eval_run(cfg, examples, tok, workers)
    finally:
        ray.shutdown()

    assert [(r["method"], r["eps"]) for r in results] == [("full", 0.0), ("ngc", 0.5)]   # the baseline first
    for r in results:
        assert set(r) == {"method", "eps", "problems", "samples_per_problem", "accuracy", "pass@1", "pass@1_stderr",
                          "pass@2", "pass@2_stderr", "completion_length_mean", "peak_kv_mean", "peak_kv_reduction"}
    assert len(GRADED) == 4   # one verifier call per job: (full, ngc) x (problem 0, problem 1), 2 samples each
    for i, r in enumerate(results):
        grades = GRADED[2 * i]["rewards"] + GRADED[2 * i + 1]["rewards"]          # problem-major
        assert GRADED[2 * i]["target"] == [examples[0]["target"]] * 2
        assert GRADED[2 * i + 1]["target"] == [examples[1]["target"]] * 2
        for k in (1, 2):
            mean, se = _hand_pass_at_k(grades, 2, k)
            assert r[f"pass@{k}"] == pytest.approx(mean, abs=1e-12)
            assert r[f"pass@{k}_stderr"] == pytest.approx(se, abs=1e-12)
        assert r["accuracy"] == sum(grades) / 4   # shaping (+5 each) is not in the score
    assert any(0 < r["accuracy"] < 1 for r in results), "the reward should mix grades (test precondition)"
    local, _ = _eval_run(cfg, examples, tok, [RolloutWorker(str(tiny_model_dir), seed=cfg.seed)])
    assert local == results

    # Peak KV: every sample ran its 16 tokens (random tiny model), so the numbers follow from the
    # schedule: full cache p + 16 - 1; eps 0.5 peaks per rlmem.metrics.schedule_peak.
    p = [len(tok(prompt_text(ex, tok, cfg.data.template), add_special_tokens=False).input_ids) for ex in examples]
    for r in results:
        assert r["completion_length_mean"] == 16.0
    base, half = results
    assert base["peak_kv_reduction"] == 1.0
    assert base["peak_kv_mean"] == pytest.approx(sum(pi + 15 for pi in p) / 2)
    method = [schedule_peak(pi, 16, cfg.eviction_config(0.5)) for pi in p]
    assert half["peak_kv_mean"] == pytest.approx(sum(method) / 2)
    expected = sum(peak_no_eviction(pi, 16) / m for pi, m in zip(p, method)) / 2
    assert half["peak_kv_reduction"] == pytest.approx(expected, rel=1e-12)
    assert half["peak_kv_reduction"] > 1.0


@pytest.mark.slow
def test_training_run_evaluates_accuracy_against_compression(tiny_model_dir, tmp_path):
    from rlmem.train.driver import run_training

    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", eval=EVAL,
                          data={"reward": "train_helpers:always_correct"},
                          trainer={"total_steps": 2, "eval_every": 1, "save_every": 0, "log_every": 2})
    run_training(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2   # log_every thins the console only: the file has every step
    for row in rows:
        for eps in ("0", "0.5"):
            assert row[f"eval/eps_{eps}/pass@1"] == 1.0 and row[f"eval/eps_{eps}/pass@2"] == 1.0
            assert row[f"eval/eps_{eps}/pass@1_stderr"] == 0.0
            assert row[f"eval/eps_{eps}/accuracy"] == 1.0
        assert row["eval/eps_0/peak_kv_reduction"] == 1.0                            # the baseline itself
        assert row["eval/eps_0.5/peak_kv_reduction"] > 1.0                           # eviction saves memory
        assert row["eval/eps_0.5/peak_kv_mean"] < row["eval/eps_0/peak_kv_mean"]
        assert row["time/eval"] > 0
    evals = [json.loads(l) for l in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["method"], e["eps"]) for e in evals] == [(1, "full", 0.0), (1, "ngc", 0.5),
                                                                  (2, "full", 0.0), (2, "ngc", 0.5)]
    for step in (1, 2):
        png = tmp_path / "run" / "figures" / f"accuracy_vs_compression_step_{step:06d}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_eval_metrics_are_flattened_per_eps():
    from rlmem.train.rollouts import eval_metrics

    out = eval_metrics([{"method": "full", "eps": 0.0, "pass@1": 0.5},
                        {"method": "ngc", "eps": 0.25, "pass@1": 0.25, "peak_kv_reduction": 2.0, "problems": 3},
                        {"method": "ngc", "eps": 0.5, "peak_kv_reduction": None}])
    assert out == {"eval/eps_0/pass@1": 0.5, "eval/eps_0.25/pass@1": 0.25, "eval/eps_0.25/peak_kv_reduction": 2.0,
                   "eval/eps_0.25/problems": 3.0}


def test_eval_plan_follows_the_run_config(tiny_model_dir, tmp_path):
    """What a run evaluates: full then its scorer at each ε (0 dropped: it is full), the step's τ,
    the eval section's sampling (max_new_tokens and stop from the rollouts when unset), the run's seed."""
    from rlmem.train.rollouts import eval_plan

    cfg = tiny_run_config(tiny_model_dir, tmp_path, "eviction.stages=[{from_step: 3, tau: 0.5}]",
                          "rollout.stop=['</answer>']", eval={"source": "countdown-generated", "eps": [0.75, 0.0, 0.25],
                                                              "temperature": 0, "num_samples": 4, "k": [1, 3]})
    plan = eval_plan(cfg, step=2)
    assert plan.runs == (("full", 0.0), ("ngc", 0.25), ("ngc", 0.75))
    assert plan.schedule.tau == 1.0 and eval_plan(cfg, step=3).schedule.tau == 0.5
    assert plan.sampling == {"temperature": 0, "top_k": 0, "top_p": 0.95, "max_new_tokens": 24, "stop": ["</answer>"]}
    assert plan.seed == cfg.seed == eval_plan(cfg, step=7).seed and plan.n == 4 and plan.ks == (1, 3)
    sp = plan.sampling_params(0)   # temperature 0: greedy, top-1 at T = 1
    assert (sp.temperature, sp.top_k, sp.top_p) == (1.0, 1, 1.0)
    assert plan.reward == cfg.data.reward and plan.config("ngc", 0.25).eps == 0.25


def test_no_eval_source_means_no_evaluation(tiny_model_dir, tmp_path):
    from rlmem.run.preflight import Prepared, load_data

    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    prepared = Prepared()
    assert cfg.eval.source is None and load_data(cfg, prepared) == [] and prepared.eval_examples == []
    assert _eval_run(cfg, [], None, []) == (None, {})


def test_generated_eval_problems_follow_the_training_generator(tiny_model_dir, tmp_path):
    from rlmem.run.preflight import Prepared, load_data

    cfg = tiny_run_config(tiny_model_dir, tmp_path, eval={**EVAL, "limit": 5})
    prepared = Prepared()
    assert load_data(cfg, prepared) == []
    test, train = prepared.eval_examples, prepared.train_examples
    assert len(test) == 5
    assert all(len(ex["numbers"]) == 3 for ex in test)   # data.countdown: min/max_numbers 3
    assert not {(tuple(sorted(e["numbers"])), e["target"]) for e in test} & {
        (tuple(sorted(e["numbers"])), e["target"]) for e in train}


def test_ray_custom_resources_are_configured_and_reach_the_workers(tiny_model_dir, tmp_path, monkeypatch):
    from rlmem.train import driver, workers
    from rlmem.run.config import ConfigError

    cfg = tiny_run_config(tiny_model_dir, tmp_path, ray={"rollout_resources": {"rollout_node": "0.01"},
                                                         "learner_resources": {"learner_node": 1}})
    assert cfg.ray.rollout_resources == {"rollout_node": 0.01} and cfg.ray.learner_resources == {"learner_node": 1.0}
    assert all(isinstance(v, float) for v in cfg.ray.learner_resources.values())
    assert tiny_run_config(tiny_model_dir, tmp_path).ray.rollout_resources is None
    with pytest.raises(ConfigError, match="ray.rollout_resources"):
        tiny_run_config(tiny_model_dir, tmp_path, ray={"rollout_resources": {"rollout_node": "many"}})
    with pytest.raises(ConfigError, match=r"ray.learner_resources.GPU.*num_gpus_per_actor"):
        tiny_run_config(tiny_model_dir, tmp_path, ray={"learner_resources": {"GPU": 1}})
    with pytest.raises(ConfigError, match=r"ray.rollout_resources.x.*must be > 0"):
        tiny_run_config(tiny_model_dir, tmp_path, ray={"rollout_resources": {"x": 0}})

    seen = []

    class Stop(Exception):
        pass

    def fake_start(cfg, model_path, **kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(workers, "init_ray", lambda cfg: False)
    monkeypatch.setattr(workers, "start_workers", fake_start)
    for kw in ({}, {"rollout_resources": {"other": 2.0}}):
        with pytest.raises(Stop):
            driver.run_training(cfg, **kw)
    assert seen == [{"rollout_resources": {"rollout_node": 0.01}, "learner_resources": {"learner_node": 1.0}},
                    {"rollout_resources": {"other": 2.0}, "learner_resources": {"learner_node": 1.0}}]

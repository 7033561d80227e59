"""Bounded staleness (trainer.max_staleness, docs/design.md section 5): with k = 1 the rollouts of step
n+1 are sampled by the weights after step n-1 while the learner trains step n; each record says so
and replays exactly under those weights; a checkpoint carries the rollouts in flight, so a resume
equals the uninterrupted run; the timeline shows the overlap."""

from __future__ import annotations

import json

import pytest

from rlmem.eviction.record import read_jsonl
from rlmem.run import checkpoint as ck
from rlmem.run.logger import records_path
from train_helpers import hf_state, tiny_run_config

TOTAL = 4
K1 = ("trainer.max_staleness=1", "algorithm.clip_eps=0.2", f"trainer.total_steps={TOTAL}", "trainer.keep_last=null",
      "logging.records_every=1", "logging.mask_image_every=0")
EVAL = {"source": "countdown-generated", "split": "test", "limit": 2, "num_samples": 1, "k": [1], "eps": [0.5],
        "max_new_tokens": 12}


def _config(tiny_model_dir, out, *extra: str):
    return tiny_run_config(tiny_model_dir, out, *K1, *extra, eval=EVAL, trainer={"eval_every": 2})


def _rows(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _ckpt(out, step: int):
    return out / "checkpoints" / f"step_{step:06d}"


@pytest.fixture(scope="module")
def k1_run(tiny_model_dir, tmp_path_factory, shared_ray):
    """Four steps with max_staleness 1, a checkpoint after each, evaluation at steps 2 and 4."""
    from rlmem.train.driver import run_training

    out = tmp_path_factory.mktemp("k1")
    run_training(_config(tiny_model_dir, out))
    return out


@pytest.mark.slow
def test_records_of_step_n_plus_1_are_sampled_by_the_weights_after_step_n_minus_1(k1_run):
    from transformers import AutoModelForCausalLM

    from rlmem.commands.replay_check import check_records

    out, rows = k1_run, _rows(k1_run)
    assert sorted(rows) == [1, 2, 3, 4]
    # steps 1 and 2 by the starting weights, then one update behind: max(0, n - 2)
    assert [{r.extra["sampled_by_step"] for r in read_jsonl(records_path(out, n))} for n in rows] == \
        [{0}, {0}, {1}, {2}]
    assert [rows[n]["rollout/staleness_mean"] for n in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [rows[n]["rollout/staleness_max"] for n in rows] == [0.0, 1.0, 1.0, 1.0]

    def worst(step: int, weights: int) -> dict:
        model = AutoModelForCausalLM.from_pretrained(str(_ckpt(out, weights) / "hf"), dtype="float32").eval()
        return check_records(model, read_jsonl(records_path(out, step)), progress=False)

    for n in (3, 4):   # exact under the weights the record names
        w = worst(n, n - 2)
        assert w["token"] <= 1e-4 and w["eviction"] <= 1e-4, (n, w)
    # ... and not under the on-policy rule's weights (after step n-1): the claim is not vacuous
    w = worst(3, 2)
    assert w["token"] > 1e-3, w


@pytest.mark.slow
def test_evaluation_at_step_n_uses_the_weights_after_step_n(k1_run, tiny_model_dir):
    """The rollouts of steps n+1 (older weights) are drained and the new weights synced before the
    evaluation: its rows equal an evaluation of checkpoint n's weights with the same plan."""
    from transformers import AutoTokenizer

    from rlmem.evaluation.pipeline import evaluate
    from rlmem.run.preflight import Prepared, load_data
    from rlmem.train.actors import RolloutWorker
    from rlmem.train.rollouts import WorkerExecutor, eval_plan

    out = k1_run
    cfg = _config(tiny_model_dir, out)
    prepared = Prepared()
    assert load_data(cfg, prepared) == []
    logged = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in logged}) == [2, 4]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for step in (2, 4):
        worker = RolloutWorker(str(_ckpt(out, step) / "hf"), dtype="float32", seed=cfg.seed)
        rows = evaluate(eval_plan(cfg, step), prepared.eval_examples, tok, WorkerExecutor([worker]))
        assert [{"step": step, **r} for r in json.loads(json.dumps(rows))] == [r for r in logged if r["step"] == step]


@pytest.mark.slow
def test_a_checkpoint_carries_the_rollouts_in_flight_and_resume_is_exact(k1_run, tiny_model_dir, tmp_path, shared_ray):
    from rlmem.train.driver import run_training

    out = k1_run
    # checkpoint 2 holds step 3's rollouts (sampled by the weights after step 1), listed in its manifest
    mid = _ckpt(out, 2)
    manifest = json.loads((mid / "manifest.json").read_text())["files"]
    assert {"inflight/step_000003.jsonl", "inflight/inflight.json"} <= set(manifest)
    carried = ck.load_inflight(mid)
    assert list(carried) == [3] and carried[3][1]["sampled_by_step"] == 1
    logged = read_jsonl(records_path(out, 3))
    strip = lambda r: {k: v for k, v in r.to_dict().items() if k != "reward"}   # noqa: E731 - rewards come later
    assert [strip(r) for r in carried[3][0]] == [strip(r) for r in logged]
    assert ck.load_inflight(_ckpt(out, TOTAL)) == {}     # nothing is in flight after the last step

    resumed = run_training(_config(tiny_model_dir, tmp_path / "resumed", f"trainer.resume={mid}"))
    assert resumed["resumed_from"] == str(mid)
    a, b = _rows(out), _rows(tmp_path / "resumed")
    assert sorted(b) == [3, 4]
    for n in (3, 4):
        for key in ("loss", "loss/token", "loss/eviction", "reward/mean", "optim/grad_norm", "rollout/staleness_mean"):
            assert b[n][key] == pytest.approx(a[n][key], rel=1e-6, abs=1e-9), (n, key)
        assert [r.to_dict() for r in read_jsonl(records_path(tmp_path / "resumed", n))] == \
            [r.to_dict() for r in read_jsonl(records_path(out, n))]
    wa, wb = hf_state(_ckpt(out, TOTAL) / "hf"), hf_state(_ckpt(tmp_path / "resumed", TOTAL) / "hf")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.mark.slow
def test_the_timeline_shows_rollouts_ahead_of_the_learner(k1_run, tmp_path, saved_figures):
    from rlmem.figures import plot_timeline
    from rlmem.run.timeline import overlap_fraction

    out = k1_run
    spans = [json.loads(l) for l in (out / "timeline.jsonl").read_text().splitlines()]
    assert (out / "figures" / "timeline.png").is_file()

    def one(step: int, actor: str, phase: str) -> dict:
        found = [s for s in spans if (s["step"], s["actor"], s["phase"]) == (step, actor, phase)]
        assert len(found) == 1, (step, actor, phase, found)
        return found[0]

    for n in range(1, TOTAL):
        learner, sync = one(n, "learner rank 0", "learner"), one(n, "rollout worker 0", "sync")
        ahead = one(n + 1, "rollout worker 0", "rollout")
        # launched before the learner step began (step 2's, at the start, queues behind step 1's)
        assert ahead["start"] < (learner["end"] if n == 1 else learner["start"])
        assert ahead["end"] <= sync["start"]        # and done before the new weights arrived: one version
        beside = [(s["start"], s["end"]) for s in spans if s["phase"] == "rollout" and s["step"] > n]
        assert _rows(out)[n]["time/overlap"] == pytest.approx(
            overlap_fraction((learner["start"], learner["end"]), beside), abs=2e-3)
    assert {s["phase"] for s in spans} == {"rollout", "reward", "learner", "sync", "eval", "log", "checkpoint"}

    path = plot_timeline(spans, tmp_path / "timeline.png")
    fig, _ = saved_figures[-1]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rollout worker 0", "learner rank 0", "driver"]
    assert len(ax.collections) == len(spans) and path.is_file()


def test_covered_counts_overlapping_spans_once():
    from rlmem.run.timeline import covered, overlap_fraction, span

    assert covered((0.0, 10.0), [(1, 3), (2, 5), (8, 12), (-4, -1), (11, 13)]) == pytest.approx(6.0)
    assert covered((0.0, 10.0), [(0, 4), (1, 2), (3, 6)]) == pytest.approx(6.0)
    assert overlap_fraction((0.0, 10.0), []) == 0.0 and overlap_fraction((2.0, 2.0), [(0, 5)]) == 0.0
    assert span(3, "driver", "reward", 101.5, 102.0, 100.0) == {
        "step": 3, "actor": "driver", "phase": "reward", "start": 1.5, "end": 2.0, "run_start": 100.0}
    with pytest.raises(ValueError, match="timeline phase 'nap'"):
        span(1, "driver", "nap", 0, 1, 0)


def test_k_at_least_1_is_refused_colocated_on_gpus(tiny_model_dir, tmp_path):
    from rlmem.run.config import ConfigError

    gpu = ("ray.placement=colocated", "ray.num_gpus_per_actor=1")
    with pytest.raises(ConfigError) as e:
        tiny_run_config(tiny_model_dir, tmp_path, *gpu, "trainer.max_staleness=1", "algorithm.clip_eps=0.2")
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].strip().startswith("- trainer.max_staleness: 1 overlaps")
    assert "ray.num_gpus_per_actor > 0" in problems[0] and "ray.placement: split" in problems[0]
    tiny_run_config(tiny_model_dir, tmp_path, *gpu)                       # k = 0: fine
    # on CPUs the engines do not sleep during the learner step: overlap is allowed colocated
    tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=colocated", "trainer.max_staleness=1",
                    "algorithm.clip_eps=0.2")

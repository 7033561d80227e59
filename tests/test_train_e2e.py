"""End to end: the Ray driver trains a tiny model; exact resume; two ZeRO-2 learner actors = one learner."""

from __future__ import annotations

import json

import pytest
import torch

from rlmem.eviction.record import read_jsonl
from rlmem.run import checkpoint as ck
from rlmem.run.logger import records_path
from train_helpers import hf_state, tiny_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory, shared_ray):
    """Two uninterrupted steps, a checkpoint after each. The runs of this module share one Ray
    session (conftest ``shared_ray``), as runs on a cluster do; each starts and stops its own actors."""
    from rlmem.train.driver import run_training

    out = tmp_path_factory.mktemp("straight")
    before = _shm_buffers()
    summary = run_training(tiny_run_config(tiny_model_dir, out, "logging.records_every=1"))
    summary["new_shm_buffers"] = sorted(_shm_buffers() - before)
    return out, summary


def _shm_buffers() -> set[str]:
    from rlmem.learner.deepspeed_shm import BUFFER_PREFIX, SHM_DIR

    return {p.name for p in SHM_DIR.glob(BUFFER_PREFIX + "*")} if SHM_DIR.is_dir() else set()


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_changes_weights_with_exact_replay(straight_run, tiny_model_dir):
    out, summary = straight_run
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward/mean", "eviction/peak_kv_mean", "replay/max_abs_logprob_diff",
                    "replay/max_abs_eviction_logprob_diff", "loss", "optim/grad_norm", "time/rollout",
                    "time/reward", "time/learner", "time/sync", "perf/tokens_per_s"):
            assert key in r, key
        assert 0 <= r["replay/max_abs_logprob_diff"] <= 1e-4
        assert 0 <= r["replay/max_abs_eviction_logprob_diff"] <= 1e-4
        assert r["eviction/eps"] == 0.5 and r["eviction/rounds_mean"] > 0
        # peak KV under eviction is below the full cache of the same prompt + completion
        assert r["eviction/kv_saving_vs_own_length"] > 1.0 and "eviction/peak_kv_reduction" not in r
        # a group whose rewards are all equal has zero advantages, so no gradient
        assert (r["optim/grad_norm"] > 0 or r["reward/std"] == 0) and r["sync/buckets"] >= 1
    assert rows[0]["optim/grad_norm"] > 0
    ckpt = out / "checkpoints" / "step_000002"
    assert summary["checkpoint"] == str(ckpt) and summary["steps"] == 2
    assert summary["new_shm_buffers"] == []   # the learner unlinked its DeepSpeed buffer as it stopped
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["wandb_run_id"] and "curriculum_step" not in state
    assert "curriculum/step" not in rows[0]
    ck.verify_checkpoint(ckpt)
    assert (ckpt / "config.yaml").is_file() and (out / "config.yaml").read_text() == (ckpt / "config.yaml").read_text()
    assert (ckpt / "engine").is_dir() and (out / "figures" / "mask_step_000001.png").is_file()
    before, after = hf_state(tiny_model_dir), hf_state(ckpt / "hf")
    assert before.keys() == after.keys()
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["peak_kv"] > 0 and s["completion"] is not None for s in samples)
    # logging.records_every=1: every rollout of every step, rewards set, as records the inspector reads
    for r in rows:
        recs = read_jsonl(records_path(out, r["step"]))
        assert len(recs) == 4 and all(rec.num_rounds > 0 for rec in recs)
        assert sum(rec.reward for rec in recs) / 4 == pytest.approx(r["reward/mean"])
        assert all(rec.extra["sampled_by_step"] == r["step"] - 1 for rec in recs)
    # step 1 was sampled by the starting weights: its records replay exactly on that model
    from transformers import AutoModelForCausalLM

    from rlmem.commands.replay_check import check_records

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    worst = check_records(model, read_jsonl(records_path(out, 1)), progress=False)
    assert worst["token"] < 1e-4 and worst["eviction"] < 1e-4


def test_resume_continues_the_same_curve(straight_run, tiny_model_dir, tmp_path, shared_ray):
    from rlmem.train.driver import run_training

    out, _ = straight_run
    # the first leg also evaluates (the straight run never does): in-training eval must not touch
    # the training RNG or weights, which is why eval settings may change on resume (rundir.OPERATIONAL_KEYS)
    first = run_training(tiny_run_config(tiny_model_dir, tmp_path, "trainer.total_steps=1", "logging.records_every=1",
                                         "eval.source=countdown-generated", "eval.split=train", "eval.limit=2",
                                         "eval.eps=[0.5]", "trainer.eval_every=1"))
    assert first["steps"] == 1
    evals = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert evals and {e["step"] for e in evals} == {1}
    # what a run killed during step 2 leaves: its records, half-written, and a temporary file
    stale = records_path(tmp_path, 2)
    stale.write_text('{"prompt_ids": [1], "compl')
    stale.with_name(stale.name + ".tmp").write_text("torn")
    second = run_training(tiny_run_config(tiny_model_dir, tmp_path, "trainer.total_steps=2", "logging.records_every=1"))
    assert second["resumed_from"] == str(tmp_path / "checkpoints" / "step_000001")
    a, b = _rows(out), _rows(tmp_path)
    assert [r["step"] for r in b] == [1, 2]
    for key in ("loss", "loss/token", "loss/eviction", "reward/mean", "response_length/mean", "optim/grad_norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-6, abs=1e-9), key
    wa = hf_state(out / "checkpoints" / "step_000002" / "hf")
    wb = hf_state(tmp_path / "checkpoints" / "step_000002" / "hf")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    sa = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    sb = json.loads((tmp_path / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    ids = json.loads((tmp_path / "checkpoints" / "step_000001" / "trainer_state.json").read_text())["wandb_run_id"]
    assert sb["wandb_run_id"] == ids and sa["step"] == sb["step"] == 2
    # step 2's records were written again, identical to the uninterrupted run's; nothing else is left
    assert [r.to_dict() for r in read_jsonl(records_path(tmp_path, 2))] == \
        [r.to_dict() for r in read_jsonl(records_path(out, 2))]
    assert sorted(p.name for p in records_path(tmp_path, 2).parent.iterdir()) == ["step_000001.jsonl", "step_000002.jsonl"]


def test_a_staged_run_equals_a_resume_with_the_new_settings(straight_run, tiny_model_dir, tmp_path, shared_ray):
    """``eviction.stages`` (one config, one run) does what a resume with overrides did (the toy recipe
    used to be a chain of those): step 2 samples and replays at the stage's τ, exactly."""
    from rlmem.train.driver import run_training

    out, _ = straight_run
    staged = run_training(tiny_run_config(tiny_model_dir, tmp_path / "staged", "logging.records_every=1",
                                          "eviction.stages=[{from_step: 2, tau: 0.25}]"))
    resumed = run_training(tiny_run_config(tiny_model_dir, tmp_path / "resumed", "logging.records_every=1",
                                           f"trainer.resume={out / 'checkpoints' / 'step_000001'}",
                                           "trainer.allow_config_change=true", "eviction.tau=0.25"))
    assert staged["steps"] == resumed["steps"] == 2
    a, s, r = _rows(out), _rows(tmp_path / "staged"), _rows(tmp_path / "resumed")
    assert [x["eviction/tau"] for x in s] == [1.0, 0.25] and [x["step"] for x in r] == [2]   # a branch logs its own steps
    for key in ("loss", "loss/token", "loss/eviction", "reward/mean", "optim/grad_norm"):
        assert s[0][key] == pytest.approx(a[0][key], rel=1e-6, abs=1e-9), key    # step 1: no stage yet
        assert s[1][key] == pytest.approx(r[0][key], rel=1e-6, abs=1e-9), key    # step 2: = the resume
    assert s[1]["replay/max_abs_eviction_logprob_diff"] <= 1e-4
    recs = read_jsonl(records_path(tmp_path / "staged", 2))
    assert {rec.eviction_config.tau for rec in recs} == {0.25}

    def eviction_logprobs(rs):
        return [la["logprob"] for x in rs for rd in x.to_dict()["eviction"]["rounds"] for la in rd["layers"]]

    assert eviction_logprobs(recs) != eviction_logprobs(read_jsonl(records_path(out, 2)))   # and τ did matter
    assert [x.to_dict() for x in recs] == [x.to_dict() for x in read_jsonl(records_path(tmp_path / "resumed", 2))]


def test_resuming_an_on_policy_checkpoint_at_max_staleness_1(straight_run, tiny_model_dir, tmp_path, shared_ray,
                                                              capsys):
    """A k = 0 checkpoint carries no rollouts in flight. Resumed after step 1 at k = 1, step 2's rule
    (sampled by the weights after step 0) cannot be kept: it is sampled by the weights after step 1,
    with a warning naming the step, which makes its records those of the on-policy run. Step 3 keeps
    the rule (the weights after step 1)."""
    from rlmem.train.driver import run_training

    out, _ = straight_run
    summary = run_training(tiny_run_config(tiny_model_dir, tmp_path, "logging.records_every=1", "trainer.total_steps=3",
                                           f"trainer.resume={out / 'checkpoints' / 'step_000001'}",
                                           "trainer.allow_config_change=true", "trainer.max_staleness=1",
                                           "algorithm.clip_eps=0.2"))
    assert summary["steps"] == 3 and [r["step"] for r in _rows(tmp_path)] == [2, 3]
    said = capsys.readouterr().out
    assert "carries no rollouts for steps [2]" in said and "sampled now by the weights after step 1" in said
    two, three = read_jsonl(records_path(tmp_path, 2)), read_jsonl(records_path(tmp_path, 3))
    assert {r.extra["sampled_by_step"] for r in two} == {r.extra["sampled_by_step"] for r in three} == {1}
    assert [r.completion_ids for r in two] == [r.completion_ids for r in read_jsonl(records_path(out, 2))]
    assert [r["rollout/staleness_mean"] for r in _rows(tmp_path)] == [0.0, 1.0]


def test_two_zero2_learner_actors_equal_one_learner(tiny_model_dir, shared_ray):
    """Data parallelism through the Ray actors: same global batch, same update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.policy import EvictionConfig
    from rlmem.train.actors import LearnerWorker, remote_class
    from rlmem.train.workers import actor_env

    cfg = tiny_run_config(tiny_model_dir, "/tmp/unused", "learner.zero_stage=2", "learner.micro_batch_size=1",
                          "algorithm.prompts_per_step=2", "algorithm.rollouts_per_prompt=2")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("12+34=", "9*8-7=", "abc", "hello world")]
    records = ReferenceEngine(model, tok, seed=1).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=20, seed=3),
        EvictionConfig(delta=8, eps=0.5, block_size=4, window=4))
    adv = [1.0, -1.0, 0.5, -0.5]
    lcfg = cfg.learner_config(str(tiny_model_dir))

    ray = shared_ray
    Learner = remote_class(LearnerWorker)
    ws: list = []

    def run(world: int):
        ws[:] = [Learner.options(num_cpus=0.5, runtime_env={"env_vars": actor_env()}).remote(
            lcfg, rank=r, world_size=world, num_threads=1) for r in range(world)]
        addr, port = ray.get(ws[0].rendezvous_address.remote())
        ray.get([w.setup.remote(addr, port) for w in ws])
        n = len(records) // world
        ms = ray.get([w.train_step.remote(records[r * n:(r + 1) * n], adv[r * n:(r + 1) * n], len(records))
                      for r, w in enumerate(ws)])
        states = ray.get([w.state_dict.remote() for w in ws])
        for w in ws:
            ray.kill(w)
        ws.clear()
        return ms, states

    try:
        (m1,), (s1,) = run(1)
        m2, (s2a, s2b) = run(2)
    finally:
        for w in ws:                     # a failed step must not leave learners in the shared session
            ray.kill(w)
    assert m1["loss"] == pytest.approx(m2[0]["loss"], rel=1e-5) and m2[0]["loss"] == m2[1]["loss"]
    assert m1["grad_norm"] > 0 and m1["grad_norm"] == pytest.approx(m2[0]["grad_norm"], rel=1e-4)
    init = {k: v.detach() for k, v in model.named_parameters()}
    assert max(float((s1[k] - init[k]).abs().max()) for k in s1) > 1e-4     # the step moved weights
    for k in s1:
        assert torch.equal(s2a[k], s2b[k]), k                                  # ranks agree exactly
        torch.testing.assert_close(s2a[k], s1[k], rtol=1e-5, atol=1e-6)

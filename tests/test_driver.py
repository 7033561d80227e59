"""The driver's pure pieces: resumable prompt stream, seeds, sharding, decoding, rewards, placement checks."""

from __future__ import annotations

import time

import pytest

from rlmem.data.stream import prompt_indices
from rlmem.train.rollouts import compute_rewards, split_even, step_seed
from rlmem.train.workers import impossible_request, placement_plan
from train_helpers import tiny_run_config


def test_prompt_stream_is_a_pure_function_of_the_position():
    whole = prompt_indices(0, 30, 10, seed=3, shuffle=True)
    # every epoch is a permutation of the data set, and epochs differ
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert whole[:10] != whole[10:20]
    # resuming at any position gives the same continuation
    assert prompt_indices(7, 13, 10, seed=3, shuffle=True) == whole[7:20]
    assert prompt_indices(0, 10, 10, seed=4, shuffle=True) != whole[:10]
    assert prompt_indices(8, 4, 10, seed=3, shuffle=False) == [8, 9, 0, 1]


def test_step_seeds_differ_per_step_and_worker_and_repeat():
    seeds = {step_seed(0, s, w) for s in range(5) for w in range(3)}
    assert len(seeds) == 15 and step_seed(0, 2, 1) == step_seed(0, 2, 1)


def test_split_even_keeps_groups_contiguous():
    assert split_even(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_even(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]


def test_decode_keeps_special_tags_and_drops_final_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlmem.evaluation.tasks import completion_text

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("<answer> 1 + 2 </answer>", add_special_tokens=False) + [tok.eos_token_id]
    assert completion_text(tok, ids) == "<answer> 1 + 2 </answer>"


def test_shaping_rewards_add_to_the_verifier_but_not_to_accuracy(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, data={"reward": "countdown",
                                                          "shaping": [{"name": "answer_tag", "weight": 0.25}]})
    ex = {"prompt": "p", "target": 7, "numbers": [3, 4], "reward": "countdown", "id": 0}
    texts = ["<answer>3+4</answer>", "<answer>3*4</answer>", "no answer", "<answer>"]
    total, verifier = compute_rewards(cfg, texts, [ex] * 4, ["p"] * 4)
    assert verifier == [1.0, 0.0, 0.0, 0.0]
    assert total == [1.25, 0.25, 0.0, 0.25]


def test_placement_plan_and_requests_that_can_never_be_granted(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=separate", "ray.num_gpus_per_actor=1")
    plan = placement_plan(cfg, {"rollout_node": 0.01}, None)
    assert plan == [("rlmem-rollout", [{"CPU": 0.5, "rollout_node": 0.01, "GPU": 1}]),
                    ("rlmem-learner", [{"CPU": 0.5, "GPU": 1}])]
    cpu_only = [{"CPU": 2.0, "memory": 1e9}]
    why = impossible_request(plan, cpu_only)
    assert "rlmem-rollout asks for" in why and "no node has GPU, rollout_node" in why and "'CPU': 2.0" in why
    assert impossible_request(placement_plan(cfg, None, None), [{"CPU": 4.0, "GPU": 1.0}]) is None
    # two bundles of 1 GPU each on two one-GPU nodes fit; three CPUs' worth on a 2-CPU cluster does not
    both = placement_plan(tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=separate",
                                          "ray.num_cpus_per_actor=3"), None, None)
    assert "no node has CPU" in impossible_request(both, [{"CPU": 2.0}])
    colocated = placement_plan(tiny_run_config(tiny_model_dir, tmp_path), None, None)
    assert colocated == [("rlmem-colocated", [{"CPU": 1.0}])] and impossible_request(colocated, [{"CPU": 1.0}]) is None


@pytest.mark.slow
def test_impossible_resources_fail_fast_naming_request_and_cluster(tiny_model_dir, tmp_path):
    """A GPU request on a CPU-only Ray fails at once (it used to hang), before any actor exists."""
    ray = pytest.importorskip("ray")
    from rlmem.run.errors import TrainingError
    from rlmem.train.workers import start_workers

    cfg = tiny_run_config(tiny_model_dir, tmp_path, "ray.num_gpus_per_actor=1", "ray.placement=separate")
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="error")
    try:
        t0 = time.monotonic()
        with pytest.raises(TrainingError) as ei:
            start_workers(cfg, str(tiny_model_dir))
        assert time.monotonic() - t0 < 10
        msg = str(ei.value)
        assert ei.value.exit_code == 2 and "'GPU': 1" in msg and "no node has GPU" in msg and "'CPU': 1.0" in msg
        assert "rlmem-rollout asks for {'CPU': 0.5, 'GPU': 1.0}" in msg
        assert ray.util.list_named_actors() == []
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_dead_actor_is_named(tiny_model_dir):
    ray = pytest.importorskip("ray")
    from rlmem.train.actors import RolloutWorker, remote_class
    from rlmem.train.workers import Workers

    ray.init(num_cpus=1, include_dashboard=False, logging_level="error")
    try:
        actors = [remote_class(RolloutWorker).options(num_cpus=0.25).remote(str(tiny_model_dir), index=i)
                  for i in range(2)]
        w = Workers(actors, [], rollout_names=["rollout worker 0", "rollout worker 1"])
        assert ray.get([a.ping.remote() for a in actors]) == [0, 1]
        ray.kill(actors[1], no_restart=True)
        # ray.kill is asynchronous: a call may still be served for a moment, then every call fails
        deadline, error = time.monotonic() + 60, None
        while error is None and time.monotonic() < deadline:
            try:
                ray.get(actors[1].ping.remote(), timeout=30)
                time.sleep(0.2)
            except ray.exceptions.RayActorError as e:
                error = e
        assert error is not None, "the killed actor kept answering"
        assert w.name_of(error.actor_id) == "rollout worker 1"
        assert w.name_of(actors[0]._actor_id) == "rollout worker 0" and w.name_of(None) is None
    finally:
        ray.shutdown()

"""Two Ray nodes: rollout workers on one, learner workers on the other, and a training step runs."""

from __future__ import annotations

import json
import time

import pytest

from train_helpers import tiny_run_config

pytestmark = pytest.mark.slow


def test_rollout_and_learner_on_different_nodes(tiny_model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from rlmem.train.driver import run_training

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"rollout_node": 1}})
    learner_node = cluster.add_node(num_cpus=1, resources={"learner_node": 1})
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, logging_level="error")
        head_id = ray.get_runtime_context().get_node_id()   # the driver joins the head node
        cfg = tiny_run_config(tiny_model_dir, tmp_path, "trainer.total_steps=1", "ray.placement=separate",
                              "logging.mask_image_every=0")
        summary = run_training(cfg, rollout_resources={"rollout_node": 0.01},
                               learner_resources={"learner_node": 0.01})
        nodes = summary["nodes"]
        assert nodes["rollout worker 0"] == head_id
        assert nodes["learner worker 0 (rank 0)"] == learner_node.node_id
        assert nodes["rollout worker 0"] != nodes["learner worker 0 (rank 0)"]
        rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1] and rows[0]["replay/max_abs_logprob_diff"] <= 1e-4
        assert (tmp_path / "checkpoints" / "step_000001" / "manifest.json").is_file()
        # the run cleaned up after itself on a cluster it did not start: actors and bundles released
        deadline = time.monotonic() + 20
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()

"""The two placements on CPU: bundle arithmetic, config rules, the GPU memory arithmetic docs/gpu.md
shows, and the step order (engines sleep before the learner step, wake and get the new weights
before the next rollout) with fake actors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rlmem.run.config import ConfigError
from rlmem.train.gpu_memory import (GIB, R1_DISTILL_1P5B, ModelDims, Workload, colocated_gpu_shares,
                                    colocated_plan, report, workload_of)
from rlmem.train.workers import actor_gpus, impossible_request, placement_plan
from train_helpers import tiny_run_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
R1_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "countdown-r1-distill-1.5b.yaml"


def test_colocated_bundle_holds_one_gpu_that_both_actors_share(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=colocated", "ray.num_gpus_per_actor=1",
                          "rollout.num_workers=2", "learner.num_workers=2", "algorithm.prompts_per_step=2")
    plan = placement_plan(cfg, {"rollout_node": 0.01}, None)
    # one GPU per bundle (not 1 + 1), CPUs and custom resources summed
    assert plan == [("rlmem-colocated", [{"CPU": 1.0, "rollout_node": 0.01, "GPU": 1}] * 2)]
    for i in range(2):
        r, l = actor_gpus(cfg, "rollout", i), actor_gpus(cfg, "learner", i)
        assert (r, l) == (0.5, 0.5) and r + l == plan[0][1][i]["GPU"]
    # two one-GPU nodes hold the two bundles; the old summed request (2 GPUs per bundle) would not fit
    assert impossible_request(plan, [{"CPU": 1.0, "GPU": 1.0, "rollout_node": 1.0}] * 2) is None
    assert colocated_gpu_shares(1) == (0.5, 0.5)


def test_split_gives_each_role_its_own_gpus_and_separate_is_its_old_name(tiny_model_dir, tmp_path):
    for name in ("split", "separate"):
        cfg = tiny_run_config(tiny_model_dir, tmp_path, f"ray.placement={name}", "ray.num_gpus_per_actor=1")
        assert cfg.ray.placement == "split"
        assert placement_plan(cfg, None, None) == [("rlmem-rollout", [{"CPU": 0.5, "GPU": 1}]),
                                                   ("rlmem-learner", [{"CPU": 0.5, "GPU": 1}])]
        assert actor_gpus(cfg, "rollout", 0) == actor_gpus(cfg, "learner", 0) == 1
    with pytest.raises(ConfigError, match=r"ray\.placement: Input should be 'colocated' or 'split' \(got 'shared'\)"):
        tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=shared")


def test_config_rules_of_colocation_name_their_keys(tiny_model_dir, tmp_path):
    ok = tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=colocated", "ray.num_gpus_per_actor=1",
                         "ray.weight_sync=cuda_ipc")
    assert ok.ray.weight_sync == "cuda_ipc"
    with pytest.raises(ConfigError) as ei:
        tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=colocated", "ray.num_gpus_per_actor=2",
                        "rollout.num_workers=2", "algorithm.prompts_per_step=2")
    keys = dict(ei.value.problems)
    assert set(keys) == {"ray.num_gpus_per_actor", "rollout.num_workers"}
    assert "rollout.num_workers (2) must equal learner.num_workers (1)" in keys["rollout.num_workers"]
    with pytest.raises(ConfigError) as ei:
        tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=colocated", "ray.num_gpus_per_actor=1",
                        "rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=2", "eviction.block_size=32",
                        "eviction.delta=64", "eviction.window=5")
    assert [k for k, _ in ei.value.problems] == ["rollout.vllm.tensor_parallel_size"]
    with pytest.raises(ConfigError) as ei:
        tiny_run_config(tiny_model_dir, tmp_path, "ray.placement=split", "ray.weight_sync=cuda_ipc")
    assert [k for k, _ in ei.value.problems] == ["ray.weight_sync"]
    # colocated on CPU (the tests' setting): no GPU rule applies
    tiny_run_config(tiny_model_dir, tmp_path, "rollout.num_workers=2", "algorithm.prompts_per_step=2")


def test_parameter_count_and_kv_bytes_match_the_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    # R1-Distill-Qwen-1.5B: 1.78B parameters with embeddings and its untied LM head; 28 KiB of KV per token
    assert R1_DISTILL_1P5B.params == 1_777_088_000
    assert R1_DISTILL_1P5B.kv_bytes_per_token() == 2 * 28 * 2 * 128 * 2 == 28_672
    # the formula against a real (small) model built from a config with the same structure
    small = Qwen2Config(num_hidden_layers=3, hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                        head_dim=32, vocab_size=1000, intermediate_size=320, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(small)
    assert ModelDims.from_config(small.to_dict()).params == sum(p.numel() for p in model.parameters())


def test_tiny_model_dims_from_its_config_json(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    dims = ModelDims.from_path(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert dims.params == sum(p.numel() for p in model.parameters())


def test_r1_colocated_plan_on_80gb_is_the_docs_number():
    from rlmem.run.config import load_config

    cfg = load_config(R1_CONFIG, ["ray.placement=colocated", "output_dir=/tmp/unused"])
    w = workload_of(cfg)
    assert w == Workload()   # the doc's settings are the paper config's
    plan = colocated_plan(R1_DISTILL_1P5B, w, int(80e9))
    assert plan.problem is None and 0.5 < plan.vllm_fraction < 0.95
    assert plan.engine_budget >= plan.engine_need
    doc = DOC.read_text()
    m = re.search(r"vLLM gpu_memory_utilization \(colocated\) = ([0-9.]+)", doc)
    assert m and float(m.group(1)) == plan.vllm_fraction
    assert report() in doc   # the tables in docs/gpu.md are this function's output, verbatim


def test_colocation_that_cannot_fit_says_why():
    w = Workload(micro_batch=64)
    plan = colocated_plan(R1_DISTILL_1P5B, w, int(80e9))
    assert "learner step needs" in plan.problem and "learner.micro_batch_size" in plan.problem
    small = colocated_plan(R1_DISTILL_1P5B, Workload(rollout_seqs=2048), int(80e9))
    assert "vLLM engine gets" in small.problem and small.engine_need > small.engine_budget
    assert small.engine_need / GIB > 60


# ---------------------------------------------------------------------------- step order, fake actors
class _Call:
    def __init__(self, log, who, method, result):
        self.log, self.who, self.method, self.result = log, who, method, result

    def remote(self, *args, **kwargs):
        self.log.append((self.who, self.method))
        return self.result(*args) if callable(self.result) else self.result


class _Actor:
    """Records every ``actor.method.remote(...)``; the result is whatever the table says."""

    def __init__(self, log, who, results):
        self.log, self.who, self.results = log, who, results

    def __getattr__(self, method):
        return _Call(self.log, self.who, method, self.results.get(method))


def _fake_run(tiny_model_dir, tmp_path, placement, log, sleep_result=None):
    from types import SimpleNamespace

    from rlmem.train.driver import Run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, f"ray.placement={placement}", "rollout.num_workers=2",
                          "learner.num_workers=2", "algorithm.prompts_per_step=2")
    # train_step: a rank's metrics plus its wall-clock span, which the driver takes out for the timeline
    learner = {"train_step": lambda *a: {"loss": 1.0, "timeline/started": 0.0, "timeline/ended": 1.0},
               "publish_weights": ([], 0, 0), "free_cached_memory": None}
    rollout = {"sleep": sleep_result, "wake_up": None, "finish_weight_update": 0}
    workers = SimpleNamespace(learners=[_Actor(log, f"learner{i}", learner) for i in range(2)],
                              rollout=[_Actor(log, f"rollout{i}", rollout) for i in range(2)],
                              rollout_names=["rollout worker 0", "rollout worker 1"])
    printed = []
    logger = SimpleNamespace(print=printed.append)
    return Run(cfg, None, [], [], workers, logger, 2, None), printed


@pytest.fixture
def passthrough_ray_get(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)


def test_colocated_step_sleeps_engines_before_learning_and_wakes_them_before_the_sync(
        tiny_model_dir, tmp_path, passthrough_ray_get):
    from rlmem.train.driver import learn_and_sync

    log: list = []
    run, printed = _fake_run(tiny_model_dir, tmp_path, "colocated", log)
    records = [SimpleRecord() for _ in range(4)]
    lm, sync, times = learn_and_sync(run, records, torch.zeros(4))
    assert lm == {"loss": 1.0} and set(times) == {"time/engine_sleep", "time/learner", "time/engine_wake",
                                                 "time/drain", "time/overlap"}
    assert times["time/overlap"] == 0.0    # k = 0: nothing generates during the learner step
    assert log == [("rollout0", "sleep"), ("rollout1", "sleep"),
                   ("learner0", "train_step"), ("learner1", "train_step"),
                   ("learner0", "free_cached_memory"), ("learner1", "free_cached_memory"),
                   ("rollout0", "wake_up"), ("rollout1", "wake_up"),
                   ("learner0", "publish_weights"), ("learner1", "publish_weights"),
                   ("rollout0", "finish_weight_update"), ("rollout1", "finish_weight_update")]
    assert printed == [] and sync["sync/buckets"] == 0


def test_split_step_never_sleeps_and_a_skipped_sleep_is_said_once(tiny_model_dir, tmp_path, passthrough_ray_get):
    from rlmem.train.driver import learn_and_sync

    log: list = []
    run, _ = _fake_run(tiny_model_dir, tmp_path, "split", log)
    learn_and_sync(run, [SimpleRecord() for _ in range(4)], torch.zeros(4))
    assert [m for _, m in log][:2] == ["train_step", "train_step"]
    assert not {"sleep", "wake_up", "free_cached_memory"} & {m for _, m in log}
    log.clear()
    why = "vLLM's sleep mode is CUDA-only: the CPU engine keeps its memory"
    run, printed = _fake_run(tiny_model_dir, tmp_path, "colocated", log, sleep_result=why)
    for _ in range(3):
        learn_and_sync(run, [SimpleRecord() for _ in range(4)], torch.zeros(4))
    assert printed == [f"[rlmem] colocated: rollout engines do not sleep during the learner step: {why}"]


class SimpleRecord:
    extra: dict = {}


def test_rollout_worker_sleep_by_engine_traits(tiny_model_dir):
    """The torch engine has no sleep mode (says so); vLLM's is CUDA-only (its CPU build says so)."""
    from rlmem.engine.registry import engine_traits
    from rlmem.train.actors import RolloutWorker

    assert engine_traits("torch").sleep_mode == "none" and engine_traits("vllm").sleep_mode == "cuda"
    w = RolloutWorker(str(tiny_model_dir), backend="torch", dtype="float32")
    assert w.sleep() == "the torch engine has no sleep mode (it holds only its weights between rollouts)"
    w.wake_up()   # nothing to wake: generation still works
    pytest.importorskip("vllm")
    if torch.cuda.is_available():
        pytest.skip("the CPU message only")
    from rlmem.engine.vllm.engine import VllmEngine

    eng = VllmEngine(str(tiny_model_dir), block_size=32)
    assert eng.sleep() == "vLLM's sleep mode is CUDA-only: the CPU engine keeps its memory"
    assert not eng.asleep and eng.llm is None

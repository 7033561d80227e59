"""The run config: every error class is reported with its dotted key, overrides, derived batch sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlmem.cli import main as cli_main
from rlmem.eviction.policy import EvictionConfig
from rlmem.train.config import (
    ConfigError, RunConfig, apply_override, config_from_dict, load_config, parse_override_value,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "countdown-tiny.yaml"


def _keys(err: ConfigError) -> list[str]:
    return [k for k, _ in err.problems]


def _load_tiny(*overrides: str) -> RunConfig:
    return load_config(TINY, list(overrides))


@pytest.mark.parametrize("name", ["countdown-tiny.yaml", "countdown-r1-distill-1.5b.yaml",
                                  "dapo-math-r1-distill-1.5b.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.trainer.total_steps >= 1
    cfg.eviction_config()  # the policy accepts it


def test_paper_settings_in_recipes():
    c = load_config(CONFIGS / "countdown-r1-distill-1.5b.yaml")
    assert (c.eviction.delta, c.eviction.block_size, c.eviction.window) == (256, 32, 5)
    assert (c.rollout.max_new_tokens, c.rollout.temperature, c.rollout.top_k) == (1024, 0.9, 50)
    assert (c.algorithm.prompts_per_step, c.algorithm.rollouts_per_prompt, c.trainer.total_steps) == (32, 16, 250)
    assert (c.optimizer.lr, c.optimizer.betas, c.optimizer.eps, c.optimizer.grad_clip) == (5e-6, (0.9, 0.95), 1e-15, 1.0)
    d = load_config(CONFIGS / "dapo-math-r1-distill-1.5b.yaml")
    assert (d.eviction.delta, d.rollout.max_new_tokens, d.rollout.temperature) == (350, 1050, 1.0)
    assert (d.algorithm.prompts_per_step, d.algorithm.rollouts_per_prompt) == (256, 8)


def test_tiny_config_is_small():
    c = _load_tiny()
    assert c.model.is_tiny and c.rollout.backend == "torch"
    assert c.batch_sizes().samples_per_step == 16
    assert c.eviction_config() == EvictionConfig(delta=16, eps=0.5, block_size=4, window=4)


def test_unknown_key_did_you_mean():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.dleta=32")
    assert ei.value.problems == [("eviction.dleta", "unknown key; did you mean 'eviction.delta'?")]


def test_unknown_key_in_wrong_section_suggests_the_section():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("mem_coef=0.5")
    assert "did you mean 'algorithm.mem_coef'?" in str(ei.value)


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("trainer.zzzz=1")
    (key, msg), = ei.value.problems
    assert key == "trainer.zzzz" and "known keys here:" in msg and "total_steps" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("algorithm.prompts_per_step=four", "rollout.backend=tpu")
    msg = str(ei.value)
    assert sorted(_keys(ei.value)) == ["algorithm.prompts_per_step", "rollout.backend"]
    assert "valid integer" in msg and "'four'" in msg and "'tpu'" in msg


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.tua=1", "learner.zero_stage=1", "seed=x")
    assert set(_keys(ei.value)) == {"eviction.tua", "learner.zero_stage", "seed"}
    assert "(3 problems)" in str(ei.value)


def test_missing_required_key():
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"output_dir": "x", "model": {"path": "tiny:"}})
    assert ei.value.problems == [("trainer", "required key is missing")]


def test_batch_sizes_that_do_not_divide():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("rollout.num_workers=3", "learner.micro_batch_size=5")
    probs = dict(ei.value.problems)
    assert "16 samples per step do not divide evenly over 3 rollout workers" in probs["rollout.num_workers"]
    assert "not divisible by learner.num_workers x learner.micro_batch_size = 1 x 5 = 5" in probs["learner.micro_batch_size"]


def test_learner_workers_times_micro_batch_must_divide():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("learner.num_workers=3")
    assert _keys(ei.value) == ["learner.micro_batch_size"]
    _load_tiny("learner.num_workers=2", "learner.micro_batch_size=2")  # 16 / (2*2): fine


def test_reused_batches_need_clipping():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("algorithm.mini_batches=2")
    assert _keys(ei.value) == ["algorithm.clip_eps"]
    cfg = _load_tiny("algorithm.mini_batches=2", "algorithm.clip_eps=0.2", "learner.micro_batch_size=2")
    b = cfg.batch_sizes()
    assert (b.samples_per_optimizer_step, b.gradient_accumulation_steps, b.micro_batches_per_learner) == (8, 4, 8)


def test_delta_below_window_uses_eviction_config_rules():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.window=32")
    assert ei.value.problems == [("eviction.delta", "eviction.delta (16) must be >= eviction.window (32)")]
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.block_size=17")
    assert _keys(ei.value) == ["eviction.delta"]
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.eps=1.5")
    assert ei.value.problems == [("eviction.eps", "must be in (0, 1], or 0 for a full cache (got 1.5)")]


def test_interoception_and_curriculum_values_checked():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.interoception.enabled=true", "eviction.interoception.eps_choices=[0.5, 2]")
    assert _keys(ei.value) == ["eviction.interoception.eps_choices.1"]
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.curriculum.enabled=true", "eviction.curriculum.retention_rates=[0.5, 0.75]")
    assert _keys(ei.value) == ["eviction.curriculum.retention_rates"]
    both = _load_tiny("eviction.curriculum.enabled=true", "eviction.interoception.enabled=true")
    assert both.eviction.curriculum.enabled and both.eviction.interoception.enabled  # the curriculum caps ε


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError) as ei:
        _load_tiny(f"model.path={tmp_path}/no-model", f"data.source={tmp_path}/train.jsonl",
                   f"trainer.resume={tmp_path}/ckpt")
    probs = dict(ei.value.problems)
    assert set(probs) == {"model.path", "data.source", "trainer.resume"}
    assert "local model directory not found" in probs["model.path"]
    assert "train.jsonl" in probs["data.source"]
    # check_files=False skips exactly these (for validating a cluster config on a laptop)
    load_config(TINY, [f"model.path={tmp_path}/no-model", f"data.source={tmp_path}/train.jsonl"], check_files=False)


def test_hub_ids_are_not_file_checked_but_local_dirs_need_config_json(tmp_path):
    _load_tiny("model.path=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "data.source=Jiayi-Pan/Countdown-Tasks-3to4")
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        _load_tiny(f"model.path={tmp_path}/m")
    (tmp_path / "m" / "config.json").write_text("{}")
    _load_tiny(f"model.path={tmp_path}/m")


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(bad)


def test_overrides_parse_as_yaml_scalars():
    cfg = _load_tiny("trainer.total_steps=2", "eviction.eps=0.75", "rollout.top_k=50", "learner.gradient_checkpointing=true",
                     "rollout.stop=['</answer>']", "ray.address=null", "logging.wandb.run_name=abc", "model.path=tiny:")
    assert cfg.trainer.total_steps == 2 and cfg.eviction.eps == 0.75 and cfg.rollout.top_k == 50
    assert cfg.learner.gradient_checkpointing is True and cfg.rollout.stop == ["</answer>"]
    assert cfg.ray.address is None and cfg.logging.wandb.run_name == "abc" and cfg.model.is_tiny
    assert cfg.eviction_config(0.25).eps == 0.25


def test_override_parser_edge_cases():
    assert parse_override_value("tiny:") == "tiny:"
    assert parse_override_value("a: b") == "a: b"
    assert parse_override_value("{a: 1}") == {"a": 1}
    assert parse_override_value("1e-4") == "1e-4"  # YAML 1.1: not a float; pydantic converts it
    d = {"model": {"path": "x"}}
    assert apply_override(d, "model.path.sub=1")[0][0] == "model.path.sub"
    assert apply_override(d, "novalue")[0][1].startswith("override 'novalue' must look like")
    assert apply_override(d, "new.section.key=3") == [] and d["new"] == {"section": {"key": 3}}


def test_optimizer_lr_accepts_yaml_scientific_notation():
    assert _load_tiny("optimizer.lr=1e-4").optimizer.lr == 1e-4


def test_unquoted_tiny_in_yaml_gets_a_hint(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(TINY.read_text().replace('path: "tiny:"', "path: tiny:"))
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "YAML syntax error" in str(ei.value) and 'write "tiny:" in quotes' in str(ei.value)
    # where YAML does parse it (flow style), it becomes {"tiny": None}: understood as "tiny:"
    assert config_from_dict({**yaml.safe_load(TINY.read_text()), "model": {"path": {"tiny": None}}}).model.is_tiny


def test_batch_sizes_paper_recipe():
    b = load_config(CONFIGS / "countdown-r1-distill-1.5b.yaml").batch_sizes()
    assert (b.samples_per_step, b.samples_per_rollout_worker, b.samples_per_learner,
            b.gradient_accumulation_steps, b.samples_per_optimizer_step) == (512, 128, 128, 16, 512)


def test_config_show_prints_derived_batch_sizes(capsys):
    assert cli_main(["config", "show", str(TINY), "algorithm.prompts_per_step=8"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["algorithm"]["prompts_per_step"] == 8  # the YAML part round-trips
    line = next(l for l in out.splitlines() if l.startswith("#   per step"))
    assert "8 prompts" in line and "32 samples" in line
    assert "8 gradient accumulation steps" in out  # 32 / (1 learner x 4)


def test_config_show_bad_config_exits_2(capsys):
    assert cli_main(["config", "show", str(TINY), "eviction.windw=2"]) == 2
    err = capsys.readouterr().err
    assert "eviction.windw: unknown key; did you mean 'eviction.window'?" in err


def test_train_command_reports_config_errors_before_anything_starts(capsys, monkeypatch):
    import sys
    import types

    called = []
    fake = types.ModuleType("rlmem.train.driver")
    fake.TrainingError = RuntimeError
    fake.run_training = lambda cfg: called.append(cfg) or 0
    monkeypatch.setitem(sys.modules, "rlmem.train.driver", fake)
    assert cli_main(["train", str(TINY), "algorithm.rollouts_per_prompt=1"]) == 2
    assert "algorithm.rollouts_per_prompt: must be >= 2" in capsys.readouterr().err
    assert called == []  # the driver never ran


def test_train_command_runs_driver_with_resolved_config(monkeypatch):
    import sys
    import types

    called = []
    fake = types.ModuleType("rlmem.train.driver")
    fake.TrainingError = RuntimeError
    fake.run_training = lambda cfg: called.append(cfg) or 0
    monkeypatch.setitem(sys.modules, "rlmem.train.driver", fake)
    assert cli_main(["train", str(TINY), "trainer.total_steps=2"]) == 0
    assert len(called) == 1 and called[0].trainer.total_steps == 2


def test_train_command_ctrl_c_exits_130(monkeypatch):
    import sys
    import types

    def interrupted(cfg):
        raise KeyboardInterrupt

    fake = types.ModuleType("rlmem.train.driver")
    fake.TrainingError = RuntimeError
    fake.run_training = interrupted
    monkeypatch.setitem(sys.modules, "rlmem.train.driver", fake)
    assert cli_main(["train", str(TINY)]) == 130


def test_train_command_reports_a_failed_run_in_one_line(capsys):
    from rlmem.train.driver import TrainingError

    import rlmem.train.driver as driver

    def dies(cfg):
        raise TrainingError("rollout worker 0 died; last checkpoint: none")

    orig = driver.run_training
    driver.run_training = dies
    try:
        assert cli_main(["train", str(TINY)]) == 1
    finally:
        driver.run_training = orig
    err = capsys.readouterr().err
    assert err.strip() == "rlmem train: rollout worker 0 died; last checkpoint: none"


def test_unknown_reward_names_are_config_errors():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.reward=nope", "data.shaping=[{name: countdwn, weight: 0.1}]"])
    keys = [k for k, _ in e.value.problems]
    assert "data.reward" in keys and "data.shaping.0.name" in keys
    assert "registered rewards" in str(e.value)


def test_tiny_model_is_made_on_first_use_and_loads(tmp_path):
    from transformers import AutoConfig

    cfg = _load_tiny(f"output_dir={tmp_path}/run", "model.tiny.layers=1")
    path = cfg.resolve_model_path()
    assert path == str(tmp_path / "run" / "tiny-model")
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 1
    mtime = (tmp_path / "run" / "tiny-model" / "config.json").stat().st_mtime_ns
    assert cfg.resolve_model_path() == path  # idempotent: not rewritten
    assert (tmp_path / "run" / "tiny-model" / "config.json").stat().st_mtime_ns == mtime
    assert _load_tiny("model.path=org/name").resolve_model_path() == "org/name"  # hub id untouched


def test_tiny_model_shape_checked():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("model.tiny.hidden=128")
    assert _keys(ei.value) == ["model.tiny"]

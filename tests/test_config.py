"""The run config: every error class is reported with its dotted key, overrides, derived batch sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlmem.cli import main as cli_main
from rlmem.eviction.policy import EvictionConfig
from rlmem.run.config import (
    ConfigError, RunConfig, apply_override, config_from_dict, load_config, parse_override_value,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "countdown-tiny.yaml"


def _keys(err: ConfigError) -> list[str]:
    return [k for k, _ in err.problems]


def _load_tiny(*overrides: str) -> RunConfig:
    return load_config(TINY, list(overrides))


@pytest.mark.parametrize("name", ["countdown-tiny.yaml", "countdown-toy.yaml", "countdown-r1-distill-1.5b.yaml",
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
        _load_tiny("algorithm.prompts_per_step=four", "rollout.top_p=2")
    msg = str(ei.value)
    assert sorted(_keys(ei.value)) == ["algorithm.prompts_per_step", "rollout.top_p"]
    assert "valid integer" in msg and "'four'" in msg and "(got 2)" in msg


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


def test_eviction_stages_are_checked_field_by_field():
    ok = _load_tiny("eviction.stages=[{from_step: 3, eps: 0.25, tau: 0.5}, {from_step: 5, tau: 0.25}]")
    assert [s.from_step for s in ok.eviction.stages] == [3, 5] and ok.eviction_config(0.25, 0.5).tau == 0.5
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.stages=[{from_step: 3, eps: 1.5}, {from_step: 2, tau: -1}, {from_step: 7}]")
    assert ei.value.problems == [
        ("eviction.stages.0.eps", "must be in (0, 1], or 0 for a full cache (got 1.5)"),
        ("eviction.stages.1.from_step", "must be after the previous stage's (3): stages are in step order"),
        ("eviction.stages.1.tau", "must be a finite number > 0 (got -1.0)"),
        ("eviction.stages.2", "sets neither eps nor tau")]
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.curriculum.enabled=true", "eviction.stages=[{from_step: 3, eps: 0.5}]")
    assert ei.value.problems == [("eviction.stages.0.eps", "eviction.curriculum sets ε itself; disable it or drop "
                                                           "eps from the stage")]
    assert _load_tiny("eviction.curriculum.enabled=true", "eviction.stages=[{from_step: 3, tau: 0.5}]")  # τ alone is fine


def test_a_full_cache_run_refuses_a_stage_that_evicts():
    """eviction.eps=0 is a full-cache control; a stage ε would turn it into an eviction run from its
    step on, silently (issue 22, item 3). The toy config's own stages, with eps=0, are refused."""
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIGS / "countdown-toy.yaml", ["eviction.eps=0"])
    assert _keys(ei.value) == ["eviction.stages.0.eps"]
    msg = ei.value.problems[0][1]
    assert "evicts at ε = 0.5 from step 61" in msg and "eviction.eps=0 'eviction.stages=[]'" in msg
    # the control as the config's header writes it, and the two ways that stay allowed
    assert not load_config(CONFIGS / "countdown-toy.yaml", ["eviction.eps=0", "eviction.stages=[]"]).eviction.stages
    assert _load_tiny("eviction.eps=0", "eviction.stages=[{from_step: 3, tau: 0.5}]")   # τ only: still full cache
    warm = _load_tiny("eviction.eps=0.5", "eviction.stages=[{from_step: 1, eps: 0}, {from_step: 3, eps: 0.5}]")
    assert [s.eps for s in warm.eviction.stages] == [0, 0.5]   # the full-cache start the message suggests


def test_a_stage_beyond_total_steps_is_a_note(capsys):
    """A stage past trainer.total_steps never runs in this run: ``rlmem config show`` (and ``rlmem
    train``) say so; it is not refused (the toy config keeps stages 2 and 3 past its 60 steps so
    that the run can be continued to 220)."""
    from rlmem.run.config.checks import config_notes

    cfg = _load_tiny("trainer.total_steps=4", "eviction.stages=[{from_step: 3, tau: 0.5}, {from_step: 5, tau: 0.25}]")
    assert config_notes(cfg) == [("eviction.stages.1.from_step", "5 lies beyond trainer.total_steps (4): this run "
                                  "ends before the stage starts (continue the run with a larger trainer.total_steps "
                                  "to reach it)")]
    assert config_notes(load_config(CONFIGS / "countdown-toy.yaml", ["trainer.total_steps=220"])) == []
    assert cli_main(["config", "show", "--no-check-files", str(TINY), "trainer.total_steps=4",
                     "eviction.stages=[{from_step: 5, tau: 0.25}]"]) == 0
    assert "# note: eviction.stages.0.from_step: 5 lies beyond trainer.total_steps (4)" in capsys.readouterr().out


def test_config_show_from_another_directory_names_the_relative_model_path(tmp_path, monkeypatch, capsys):
    """Relative paths are taken from the current directory. Run from elsewhere, the toy config's
    ``models/countdown-toy`` (the shape of a hub id) used to pass the checks and go to the hub; now
    the message says how it was taken and where it exists (issue 22, item 9)."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["config", "show", str(CONFIGS / "countdown-toy.yaml")]) == 2
    err = capsys.readouterr().err
    assert (f"model.path: models/countdown-toy is not a directory here (relative paths are taken from the current "
            f"directory, {tmp_path}), so it would be fetched as a hub id; but {REPO / 'models/countdown-toy'} exists: "
            f"run from {REPO} or give an absolute path") in err
    assert cli_main(["config", "show", str(CONFIGS / "countdown-toy.yaml"),
                     f"model.path={REPO / 'models/countdown-toy'}"]) == 0   # absolute: fine from anywhere
    capsys.readouterr()
    monkeypatch.chdir(REPO)
    assert cli_main(["config", "show", "configs/countdown-toy.yaml"]) == 0   # the README's way still works


def test_max_new_tokens_beyond_the_models_positions_is_refused_before_ray():
    """``rollout.max_new_tokens`` (or eval's) that cannot fit the local model's positions after
    even a one-token prompt is a config problem (found trying hostile inputs for issue 22): the
    rollout workers would refuse it only after Ray and the workers started."""
    toy = CONFIGS / "countdown-toy.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(toy, ["rollout.max_new_tokens=100000", "eval.max_new_tokens=1024"])
    assert ei.value.problems == [
        ("rollout.max_new_tokens", "100000 new tokens after a prompt exceed the model's max_position_embeddings "
                                   "(1024, models/countdown-toy/config.json)"),
        ("eval.max_new_tokens", "1024 new tokens after a prompt exceed the model's max_position_embeddings "
                                "(1024, models/countdown-toy/config.json)")]
    assert load_config(toy, ["rollout.max_new_tokens=1023"]).rollout.max_new_tokens == 1023


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


def test_config_show_prints_derived_batch_sizes(capsys, tmp_path):
    # a fresh output_dir: a run of the tiny config left in outputs/ would (rightly) refuse the change
    assert cli_main(["config", "show", str(TINY), "algorithm.prompts_per_step=8", f"output_dir={tmp_path}"]) == 0
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

    from rlmem.run.preflight import resolve_model_path

    cfg = _load_tiny(f"output_dir={tmp_path}/run", "model.tiny.layers=1")
    assert not (tmp_path / "run").exists()   # loading and checking a config writes nothing
    cfg.model_dump(), cfg.to_yaml(), cfg.batch_sizes(), cfg.learner_config("m")
    assert not (tmp_path / "run").exists()
    path = resolve_model_path(cfg)
    assert path == str(tmp_path / "run" / "tiny-model")
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 1
    mtime = (tmp_path / "run" / "tiny-model" / "config.json").stat().st_mtime_ns
    assert resolve_model_path(cfg) == path  # idempotent: not rewritten
    assert (tmp_path / "run" / "tiny-model" / "config.json").stat().st_mtime_ns == mtime


def test_offline_hub_model_missing_from_the_cache_names_model_path(monkeypatch, tmp_path):
    from rlmem.run.preflight import model_problem

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    key, msg = model_problem(_load_tiny("model.path=nobody-here/no-such-model"))
    assert key == "model.path" and "nobody-here/no-such-model" in msg and "not in the local Hugging Face cache" in msg
    assert "\n" not in msg
    assert model_problem(_load_tiny()) is None   # tiny: nothing to fetch


def test_tiny_model_shape_checked():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("model.tiny.hidden=128")
    assert _keys(ei.value) == ["model.tiny"]


# ---------------------------------------------------------------------------------------------
# One definition per concept, and the validation gaps of issue 11 (item 10)


def test_eviction_section_is_derived_from_eviction_config():
    import dataclasses

    from rlmem.run.config import EvictionSection

    fields = [f.name for f in dataclasses.fields(EvictionConfig)]
    assert [k for k in EvictionSection.model_fields if k not in ("curriculum", "interoception", "stages")] == fields
    defaults = EvictionSection()
    assert {f: getattr(defaults, f) for f in fields} == dataclasses.asdict(EvictionConfig())
    assert config_from_dict({"output_dir": "x", "model": {"path": "tiny:"}, "trainer": {"total_steps": 1}}
                            ).eviction_config() == EvictionConfig()


def test_learner_and_optimizer_sections_are_derived_from_learner_config(tmp_path):
    import dataclasses

    from rlmem.learner.config import LearnerConfig

    cfg = _load_tiny("optimizer.lr=2e-5", "algorithm.mem_coef=0.5", "learner.micro_batch_size=2")
    lc = cfg.learner_config("m")
    assert isinstance(lc, LearnerConfig)
    assert (lc.lr, lc.mem_coef, lc.micro_batch_size, lc.max_len) == (2e-5, 0.5, 2, cfg.rollout.max_new_tokens)
    defaults = {f.name: f.default for f in dataclasses.fields(LearnerConfig)}
    o = RunConfig.model_fields["optimizer"].default
    assert {k: getattr(o, k) for k in type(o).model_fields} == {k: defaults[k] for k in type(o).model_fields}


def test_non_finite_numbers_are_refused():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("optimizer.lr=.inf", "rollout.temperature=.nan")
    assert sorted(_keys(ei.value)) == ["optimizer.lr", "rollout.temperature"]
    assert "finite number" in str(ei.value)


def test_booleans_are_not_numbers():
    with pytest.raises(ConfigError) as ei:
        _load_tiny("trainer.total_steps=true", "optimizer.lr=false", "learner.zero_stage=true")
    assert sorted(_keys(ei.value)) == ["learner.zero_stage", "optimizer.lr", "trainer.total_steps"]
    assert "got a boolean" in str(ei.value)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text(TINY.read_text() + "\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "duplicate key" in str(ei.value) and "'seed' appears twice" in str(ei.value)


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError) as ei:
        _load_tiny(f"output_dir={f}")
    assert ei.value.problems == [("output_dir", f"{f} exists and is not a directory")]


def test_retention_rate_error_text_matches_what_is_accepted():
    ok = _load_tiny("eviction.curriculum.enabled=true", "eviction.curriculum.retention_rates=[1.0, 0.5]")
    assert ok.eviction.curriculum.retention_rates == [1.0, 0.5]   # 1.0 is accepted ...
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.curriculum.enabled=true", "eviction.curriculum.retention_rates=[1.5, 0.5]")
    assert ei.value.problems == [("eviction.curriculum.retention_rates.0", "must be in (0, 1] (got 1.5)")]  # ... and said so


def test_kl_coef_reaches_the_learner_and_must_be_non_negative():
    cfg = _load_tiny("algorithm.kl_coef=0.1")
    assert cfg.learner_config("m").kl_coef == 0.1 and cfg.learner_config("m").loss_config().kl_coef == 0.1
    with pytest.raises(ConfigError) as ei:
        _load_tiny("algorithm.kl_coef=-0.1")
    assert _keys(ei.value) == ["algorithm.kl_coef"]


def test_config_show_prints_the_eviction_defaults_of_eviction_config(tmp_path, capsys):
    p = tmp_path / "minimal.yaml"
    p.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{path: 'tiny:'}}\ntrainer: {{total_steps: 1}}\n")
    assert cli_main(["config", "show", str(p), "data.countdown.num_problems=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["eviction"]
    assert {k: v for k, v in shown.items() if k not in ("curriculum", "interoception", "stages")} == EvictionConfig().to_dict()


def test_torch_threads_per_actor_is_checked_and_operational():
    """Two runs sharing a machine set ray.torch_threads; a resumed run may change it freely."""
    from rlmem.run.rundir import meaning_differences

    with pytest.raises(ConfigError) as e:
        _load_tiny("ray.torch_threads=0")
    assert _keys(e.value) == ["ray.torch_threads"]
    a, b = _load_tiny(), _load_tiny("ray.torch_threads=1")
    assert a.ray.torch_threads is None and b.ray.torch_threads == 1
    assert not meaning_differences(a.model_dump(mode="json"), b.model_dump(mode="json"))


def test_one_dtype_table_aliases_and_tolerances():
    """rlmem.dtypes is the one table: aliases resolve everywhere, tolerances are docs/design.md section 4's."""
    import torch

    from rlmem.dtypes import LEARNER_DTYPES, canonical, replay_tolerance, torch_dtype
    from rlmem.engine.registry import engine_traits
    from rlmem.learner.config import LearnerConfig

    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("float64") is torch.float64
    assert torch_dtype(torch.float16) is torch.float16
    assert [replay_tolerance(d) for d in ("fp32", "fp64", "bf16")] == [1e-4, 1e-9, 0.15]
    with pytest.raises(ValueError, match=r"learner.dtype: must be one of \['float32', 'float64', 'bfloat16'\] \(got 'float16'\)"):
        canonical("float16", choices=LEARNER_DTYPES, what="learner.dtype")
    with pytest.raises(ValueError, match="dtype: must be one of .*got 'half'"):
        torch_dtype("half")
    assert LearnerConfig(model_path="m", dtype="bf16", max_len=8).dtype == "bfloat16"
    with pytest.raises(ValueError, match="learner.dtype: must be one of"):
        LearnerConfig(model_path="m", dtype="float16", max_len=8)
    assert engine_traits("torch").dtypes == LEARNER_DTYPES
    assert "float64" not in engine_traits("vllm").dtypes
    with pytest.raises(ConfigError) as ei:
        _load_tiny("model.dtype=float64")
    assert _keys(ei.value) == ["model.dtype"]


def test_clip_rule_is_one_rule_with_one_message():
    """learner.clip_rule is the only clip check: the run config, LearnerConfig and LossConfig all give
    its message, naming the fields."""
    from rlmem.learner.clip_rule import clip_problems
    from rlmem.learner.config import LearnerConfig
    from rlmem.learner.loss import LossConfig

    (key, msg), = clip_problems(None, None, ppo_epochs=2)
    assert key == "algorithm.clip_eps" and "algorithm.ppo_epochs 2" in msg and "algorithm.mini_batches 1" in msg
    with pytest.raises(ConfigError) as ei:
        _load_tiny("algorithm.ppo_epochs=2")
    assert ei.value.problems == [(key, msg)]
    with pytest.raises(ValueError) as e2:
        LearnerConfig(model_path="m", max_len=8, ppo_epochs=2)
    assert str(e2.value) == f"{key}: {msg}"
    with pytest.raises(ValueError, match=r"^algorithm\.clip_eps_high: needs algorithm\.clip_eps"):
        LossConfig(max_len=4, clip_eps_high=0.3)
    with pytest.raises(ConfigError) as ei:
        _load_tiny("algorithm.clip_eps=0.2", "algorithm.clip_eps_high=0.1")
    assert ei.value.problems == [("algorithm.clip_eps_high", "(0.1) must be >= algorithm.clip_eps (0.2)")]
    with pytest.raises(ValueError, match=r"^algorithm\.clip_eps: must be > 0 or null \(got -0\.1\)"):
        LossConfig(max_len=4, clip_eps=-0.1)
    assert clip_problems(0.2, 0.28, mini_batches=4, ppo_epochs=2) == []


def test_scorer_args_in_the_run_config():
    """eviction.scorer_args is EvictionConfig's field: checked against the scorer's declared settings."""
    cfg = _load_tiny("eviction.scorer=streamingllm", "eviction.scorer_args={sinks: 8}")
    assert cfg.eviction_config().scorer_args == {"sinks": 8} and cfg.eviction_config().make_scorer().sinks == 8
    with pytest.raises(ConfigError) as ei:
        _load_tiny("eviction.scorer=snapkv", "eviction.scorer_args={sinks: 8}")
    assert ei.value.problems == [("eviction.scorer_args", "scorer 'snapkv' has no setting 'sinks' (its settings: kernel_size)")]
    assert _load_tiny().eviction_config().scorer_args == {}


def test_stale_rollouts_need_clipping_and_tis_settings_reach_the_learner(capsys):
    """trainer.max_staleness >= 1 without algorithm.clip_eps is refused before start, in one line
    naming the key (docs/design.md section 5); the TIS fields are the algorithm section's."""
    with pytest.raises(ConfigError) as ei:
        _load_tiny("trainer.max_staleness=1")
    assert ei.value.problems == [("algorithm.clip_eps", "must be set (e.g. 0.2) when trainer.max_staleness is 1: "
                                  "stale rollouts are off-policy and need the clipped surrogate")]
    assert cli_main(["config", "show", str(TINY), "trainer.max_staleness=2"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.clip_eps: must be set (e.g. 0.2) when trainer.max_staleness is 2" in err
    assert "Traceback" not in err
    cfg = _load_tiny("trainer.max_staleness=2", "algorithm.clip_eps=0.2", "algorithm.tis=sequence",
                     "algorithm.tis_cap=3")
    lc = cfg.learner_config("m")
    assert (lc.tis, lc.tis_cap, lc.loss_config().tis, lc.loss_config().tis_cap) == ("sequence", 3.0, "sequence", 3.0)
    assert _load_tiny().learner_config("m").loss_config().tis is None       # off by default
    for off in ("off", "false", "none", "null"):    # YAML reads `off` as false: every spelling of "no TIS"
        assert _load_tiny(f"algorithm.tis={off}").algorithm.tis is None
    for bad, key in (("algorithm.tis=tokens", "algorithm.tis"), ("algorithm.tis=on", "algorithm.tis"),
                     ("algorithm.tis_cap=0", "algorithm.tis_cap")):
        with pytest.raises(ConfigError) as ei:
            _load_tiny(bad)
        assert _keys(ei.value) == [key], bad


def test_actor_threads_share_the_cores_between_roles_that_run_at_once():
    """k = 0: rollouts and the learner take turns, each gets every core; k >= 1 overlaps them, so
    they split the cores (two 2-thread actors on 2 cores ran the toy recipe many-fold slower)."""
    from rlmem.train.workers import actor_threads

    assert actor_threads(_load_tiny(), 2) == 2
    stale = _load_tiny("trainer.max_staleness=1", "algorithm.clip_eps=0.2")
    assert actor_threads(stale, 2) == 1 and actor_threads(stale, 16) == 8
    assert actor_threads(_load_tiny("trainer.max_staleness=1", "algorithm.clip_eps=0.2", "ray.torch_threads=3"), 2) == 3

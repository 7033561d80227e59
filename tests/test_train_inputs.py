"""Bad training inputs end in one line and exit 2 before Ray starts (issue 11, items 9 and 10)."""

from __future__ import annotations

import pytest

from rlmem.cli import main as cli_main
from rlmem.run.config import RunConfig
from rlmem.run.preflight import Prepared, load_data, preflight
from train_helpers import tiny_run_config


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start Ray."""
    import ray

    def boom(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", boom)


BAD_FILES = [
    ("empty.jsonl", "", "{p}: no rows (the file is empty)"),
    ("broken.jsonl", '{"target": 5, "nums": [1, 4]}\n\n{"target": 6, "nums": [1\n', "{p}:3: not valid JSON"),
    ("schema.jsonl", '{"question_text": "x", "gold": 1}\n', "{p}: cannot recognise the schema from columns"),
    ("row.jsonl", '{"target": 5, "nums": [1, 4]}\n{"target": "five", "nums": [1, 4]}\n',
     "{p}:2: row field 'target' is not an integer"),
    ("notobj.jsonl", '[1, 2]\n', "{p}:1: expected a JSON object, got an array"),
]


@pytest.mark.parametrize("name, text, want", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_dataset_problems_name_file_and_line(tiny_model_dir, tmp_path, name, text, want):
    p = tmp_path / name
    p.write_text(text)
    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", f"data.source={p}")
    (key, msg), = load_data(cfg, Prepared())
    assert key == "data.source" and msg.startswith(want.format(p=p)) and "\n" not in msg


def test_train_with_a_bad_dataset_exits_2_before_ray(tiny_model_dir, tmp_path, capsys, no_ray):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(tiny_run_config(tiny_model_dir, tmp_path / "run", f"data.source={p}").to_yaml())
    assert cli_main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"data.source: {p}: no rows (the file is empty)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()   # nothing was written either


def test_unknown_or_unavailable_engine_is_refused_before_anything_starts(tiny_model_dir, tmp_path, capsys, no_ray):
    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", "rollout.backend=tpu")
    _, problems = preflight(cfg, load=False)
    assert problems[0][0] == "rollout.backend" and "unknown engine 'tpu'" in problems[0][1]
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(tiny_run_config(tiny_model_dir, tmp_path / "run", "rollout.backend=vllm").to_yaml())
    for cmd in (["config", "show"], ["train"]):
        assert cli_main(cmd + [str(cfg_path)]) == 2
        err = capsys.readouterr().err
        assert "rollout.backend:" in err and "vllm" in err and "Traceback" not in err


def test_a_wandb_mode_wandb_would_refuse_is_named_before_anything_starts(tiny_model_dir, tmp_path, capsys, no_ray,
                                                                          monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "ofline")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(tiny_run_config(tiny_model_dir, tmp_path / "run").to_yaml())
    assert cli_main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "logging.wandb.mode: WANDB_MODE='ofline' in the environment is not a W&B mode" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", "logging.wandb.mode=disabled")
    assert preflight(cfg, load=False)[1] == []     # W&B is not started at all then


def test_config_show_runs_the_checks_train_runs(tiny_model_dir, tmp_path, capsys):
    """A used output_dir, a bad dataset: `config show` refuses what `train` would refuse."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(tiny_run_config(tiny_model_dir, tmp_path / "run", "trainer.resume=never").to_yaml())
    assert cli_main(["config", "show", str(cfg_path)]) == 2
    assert "already holds another run's files" in capsys.readouterr().err
    assert cli_main(["config", "show", str(cfg_path), "trainer.start_over=true"]) == 0
    assert "# run directory: fresh start; moving 1 earlier entries" in capsys.readouterr().out


def test_a_run_config_round_trips_through_its_yaml(tiny_model_dir, tmp_path):
    import yaml

    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    assert RunConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg

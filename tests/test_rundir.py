"""Run-directory ownership and start plans (issue 11, items 1-5): lock, refuse mixing runs, start
over by moving aside, resume from the newest verified checkpoint, config changes refused, logs trimmed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from rlmem.run import checkpoint as ck
from rlmem.run.errors import TrainingError
from rlmem.run.rundir import (
    LOCK_FILE, RunDirLock, apply_plan, meaning_differences, plan_start, trim_logs,
)
from train_helpers import tiny_run_config


def _ckpt(cfg, step: int):
    def parts(paths):
        paths.engine.mkdir()
        (paths.engine / "model.pt").write_bytes(b"w" * 64)
    return ck.save_checkpoint(cfg.output_path, ck.TrainerState(step=step), parts, config_yaml=cfg.to_yaml())


def _jsonl(path, steps):
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in steps))


def _steps(path):
    return [json.loads(l)["step"] for l in path.read_text().splitlines()]


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    code = ("import sys, time; sys.path.insert(0, %r); from rlmem.run.rundir import RunDirLock; "
            "l = RunDirLock(%r).acquire(); print('locked', flush=True); time.sleep(60)") % (os.getcwd(), str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError) as ei:
            RunDirLock(tmp_path).acquire()
        msg = str(ei.value)
        assert ei.value.exit_code == 2 and f"pid {holder.pid} on {socket.gethostname()}" in msg and "in use" in msg
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file is stale and is taken over
    assert (tmp_path / LOCK_FILE).exists()
    lock = RunDirLock(tmp_path).acquire()
    assert lock.took_over["pid"] == holder.pid
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_fresh_start_into_a_used_directory_is_refused_then_moved_aside(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, "trainer.resume=never")
    _ckpt(cfg, 4)
    _jsonl(tmp_path / "samples.jsonl", [1, 2, 3, 4])
    with pytest.raises(TrainingError, match="already holds another run's files .* trainer.start_over=true"):
        plan_start(cfg)
    over = tiny_run_config(tiny_model_dir, tmp_path, "trainer.resume=never", "trainer.start_over=true")
    plan = plan_start(over)
    assert plan.resume_from is None and {p.name for p in plan.move_aside} == {"checkpoints", "samples.jsonl"}
    apply_plan(over, plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "previous"]
    (moved,) = (tmp_path / "previous").iterdir()
    assert _steps(moved / "samples.jsonl") == [1, 2, 3, 4]                     # nothing deleted
    assert (moved / "checkpoints" / "step_000004" / "manifest.json").is_file()
    # the old run's checkpoints can no longer be picked up by auto-resume
    assert plan_start(tiny_run_config(tiny_model_dir, tmp_path)).resume_from is None


def test_auto_resume_takes_the_newest_verified_and_says_why_it_skipped(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    _ckpt(cfg, 1)
    _ckpt(cfg, 2)
    (_ckpt(cfg, 3) / "engine" / "model.pt").write_bytes(b"w")
    plan = plan_start(cfg)
    assert plan.resume_from == ck.checkpoint_dir(tmp_path, 2) and plan.step == 2
    assert "skipped newer step_000003" in plan.describe() and "engine/model.pt" in plan.describe()
    assert [p.name for p in plan.move_aside] == ["step_000003"]   # the abandoned continuation goes aside


def test_explicit_resume_at_a_damaged_checkpoint_fails_in_one_line(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    d = _ckpt(cfg, 2)
    (d / "trainer_state.json").write_text("{")
    with pytest.raises(TrainingError) as ei:
        plan_start(tiny_run_config(tiny_model_dir, tmp_path, f"trainer.resume={d}"))
    msg = str(ei.value)
    assert "\n" not in msg and str(d / "trainer_state.json") in msg and ei.value.exit_code == 2


def test_resume_with_a_changed_meaning_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    _ckpt(tiny_run_config(tiny_model_dir, tmp_path), 2)
    changed = ("eviction.eps=0.75", "algorithm.prompts_per_step=4", "optimizer.lr=0.01")
    with pytest.raises(TrainingError) as ei:
        plan_start(tiny_run_config(tiny_model_dir, tmp_path, *changed))
    msg = str(ei.value)
    for want in ("eviction.eps: 0.5 -> 0.75", "algorithm.prompts_per_step: 2 -> 4", "optimizer.lr: 0.001 -> 0.01"):
        assert want in msg
    assert "trainer.allow_config_change=true" in msg
    plan = plan_start(tiny_run_config(tiny_model_dir, tmp_path, *changed, "trainer.allow_config_change=true"))
    assert plan.step == 2 and "config changed on purpose" in plan.describe()
    # operational changes (length, logging, Ray) are not changes of meaning
    assert plan_start(tiny_run_config(tiny_model_dir, tmp_path, "trainer.total_steps=5", "logging.progress_bar=true",
                                      "ray.num_cpus_per_actor=1")).step == 2


def test_resume_trims_every_log_to_the_checkpoint(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    _ckpt(cfg, 2)
    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
        _jsonl(tmp_path / name, [1, 1, 2, 3, 4])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "x"')   # torn by a crash
    apply_plan(cfg, plan_start(cfg))
    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
        assert _steps(tmp_path / name) == [1, 1, 2], name


def test_config_yaml_is_not_overwritten_by_a_refused_or_no_op_rerun(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    apply_plan(cfg, plan_start(cfg))
    _ckpt(cfg, 2)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(TrainingError):
        plan_start(tiny_run_config(tiny_model_dir, tmp_path, "eviction.eps=0.75"))
    assert (tmp_path / "config.yaml").read_text() == before


def test_meaning_differences_ignores_operational_keys():
    a = {"trainer": {"total_steps": 2, "keep_last": 3, "eval_every": 20}, "eviction": {"eps": 0.5}, "logging": {"x": 1}}
    b = {"trainer": {"total_steps": 9, "keep_last": 1, "eval_every": 40}, "eviction": {"eps": 0.25}, "logging": {"x": 2}}
    assert meaning_differences(a, b) == ["eviction.eps: 0.5 -> 0.25"]
    trim_logs(__import__("pathlib").Path("/nonexistent-dir"), 1)   # nothing to trim: no error


def test_a_run_stopped_before_its_first_checkpoint_restarts_but_another_config_is_refused(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    apply_plan(cfg, plan_start(cfg))
    _jsonl(tmp_path / "metrics.jsonl", [1])
    plan = plan_start(cfg)
    assert plan.resume_from is None and plan.step == 0 and plan.move_aside == []
    apply_plan(cfg, plan)
    assert _steps(tmp_path / "metrics.jsonl") == []   # trimmed to "nothing done"
    with pytest.raises(TrainingError, match="already holds another run's files"):
        plan_start(tiny_run_config(tiny_model_dir, tmp_path, "eviction.eps=0.75"))


def test_a_setting_added_since_the_run_was_saved_is_no_change_at_its_default():
    """Resuming a run saved by an older rlmem (its config.yaml lacks settings added since) is not a
    config change while the new settings keep their defaults; a non-default value still is."""
    old = {"trainer": {"total_steps": 2}, "algorithm": {"clip_eps": None}, "eviction": {"eps": 0.5}}
    new = {"trainer": {"total_steps": 2, "max_staleness": 0}, "algorithm": {"clip_eps": None, "tis": None,
                                                                           "tis_cap": 2.0},
           "eviction": {"eps": 0.5}}
    assert meaning_differences(old, new) == []
    new["trainer"]["max_staleness"], new["algorithm"]["tis_cap"] = 1, 3.0
    assert meaning_differences(old, new) == ["algorithm.tis_cap: None -> 3.0", "trainer.max_staleness: None -> 1"]
    assert meaning_differences({"eviction": {}}, {"eviction": {"no_such_setting": 1}}) == \
        ["eviction.no_such_setting: None -> 1"]

"""Checkpoint layout, atomic trainer state, latest-complete selection, rotation, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from rlmem.train import checkpoint as ck
from rlmem.train.checkpoint import (
    TrainerState, capture_rng_state, checkpoint_dir, latest_checkpoint, list_checkpoints, load_trainer_state,
    resolve_resume, restore_rng_state, rotate_checkpoints, save_checkpoint,
)


def _save(out, step, keep_last=None, **kw):
    def parts(paths):
        paths.engine.mkdir()
        (paths.engine / "model.pt").write_bytes(b"x" * 10)
        paths.hf.mkdir()
        (paths.hf / "config.json").write_text("{}")
    return save_checkpoint(out, TrainerState(step=step, **kw), parts, keep_last=keep_last)


def test_layout_and_state_round_trip(tmp_path):
    d = _save(tmp_path, 7, data_position={"epoch": 1, "index": 28}, curriculum_step=7, wandb_run_id="abc123")
    assert d == tmp_path / "checkpoints" / "step_000007" == checkpoint_dir(tmp_path, 7)
    assert (d / "engine" / "model.pt").exists() and (d / "hf" / "config.json").exists()
    st = load_trainer_state(d)
    assert (st.step, st.data_position, st.curriculum_step, st.wandb_run_id) == (7, {"epoch": 1, "index": 28}, 7, "abc123")
    assert st.saved_at > 0
    assert not list(d.glob(".trainer_state.json.tmp*"))  # no temp file left behind


def test_state_is_written_after_the_parts(tmp_path):
    seen = []

    def parts(paths):
        seen.append(paths.state.exists())
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, TrainerState(step=3), parts)
    assert seen == [False]
    assert (checkpoint_dir(tmp_path, 3)).is_dir() and latest_checkpoint(tmp_path) is None


def test_latest_picks_only_complete_checkpoints(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    half = checkpoint_dir(tmp_path, 6)
    (half / "engine").mkdir(parents=True)                # crashed before the state was written
    torn = checkpoint_dir(tmp_path, 8)
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"step": 8, "rng"')  # torn write (not via our atomic path)
    (tmp_path / "checkpoints" / "step_000010.old").mkdir()  # not a checkpoint name
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert [s for s, _ in list_checkpoints(tmp_path, complete_only=False)] == [2, 4, 6, 8]


def test_latest_on_empty_dir(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert resolve_resume(tmp_path, "auto") is None


def test_resave_over_incomplete_dir_clears_it(tmp_path):
    stale = checkpoint_dir(tmp_path, 5)
    (stale / "engine").mkdir(parents=True)
    (stale / "engine" / "garbage").write_text("old")
    _save(tmp_path, 5)
    assert not (stale / "engine" / "garbage").exists() and latest_checkpoint(tmp_path) == stale


def test_atomic_write_failure_keeps_previous_state(tmp_path, monkeypatch):
    d = _save(tmp_path, 1)
    before = (d / "trainer_state.json").read_text()

    def boom(*a, **k):
        raise OSError("crash during rename")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError):
        ck._atomic_write_json(d / "trainer_state.json", {"step": 999})
    assert (d / "trainer_state.json").read_text() == before


def test_rotation_keeps_last_n_and_removes_stale_partials(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    rotated = checkpoint_dir(tmp_path, 2)                               # complete; rotated out
    (checkpoint_dir(tmp_path, 0)).mkdir()                                # stale partial, older than newest
    in_progress = checkpoint_dir(tmp_path, 9)
    in_progress.mkdir()                                                  # newer partial: maybe being written
    _save(tmp_path, 4, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert not checkpoint_dir(tmp_path, 0).exists() and not rotated.exists()
    assert in_progress.exists()
    assert rotate_checkpoints(tmp_path, 5) == []
    with pytest.raises(ValueError):
        rotate_checkpoints(tmp_path, 0)


def test_resolve_resume(tmp_path):
    d = _save(tmp_path, 2)
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path, "auto") == d
    assert resolve_resume(tmp_path, str(d)) == d
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_rng_round_trip_through_json(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), np.random.randn(), torch.rand(3)  # advance (numpy caches a gaussian)
    state = json.loads(json.dumps(capture_rng_state()))                  # survives trainer_state.json
    want = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(5).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(5).tolist())
    assert got == want


def test_rng_state_saved_in_checkpoint(tmp_path):
    torch.manual_seed(0)
    d = save_checkpoint(tmp_path, TrainerState(step=1, rng=capture_rng_state()))
    want = torch.rand(2)
    torch.manual_seed(1)
    restore_rng_state(load_trainer_state(d).rng)
    assert torch.equal(torch.rand(2), want)

"""Checkpoint layout, manifest verification (each kind of damage named), newest-verified selection,
rotation, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from rlmem.run import checkpoint as ck
from rlmem.run.checkpoint import (
    CheckpointError, TrainerState, capture_rng_state, checkpoint_dir, latest_verified, list_checkpoints,
    load_trainer_state, restore_rng_state, rotate_checkpoints, save_checkpoint, verify_checkpoint,
)


def _parts(paths):
    paths.engine.mkdir()
    (paths.engine / "model.pt").write_bytes(b"x" * (ck.CHECKSUM_MAX_BYTES + 10))   # a "large" file: size only
    (paths.root / "latest").write_text("engine")
    paths.hf.mkdir()
    (paths.hf / "config.json").write_text("{}")


def _save(out, step, keep_last=None, **kw):
    return save_checkpoint(out, TrainerState(step=step, **kw), _parts, keep_last=keep_last, config_yaml="seed: 0\n")


def test_layout_and_state_round_trip(tmp_path):
    d = _save(tmp_path, 7, wandb_run_id="abc123")
    assert d == tmp_path / "checkpoints" / "step_000007" == checkpoint_dir(tmp_path, 7)
    assert (d / "engine" / "model.pt").exists() and (d / "hf" / "config.json").exists()
    assert (d / "config.yaml").read_text() == "seed: 0\n"
    st = load_trainer_state(d)
    assert (st.step, st.wandb_run_id) == (7, "abc123") and st.saved_at > 0
    manifest = json.loads((d / "manifest.json").read_text())["files"]
    assert set(manifest) == {"engine/model.pt", "latest", "hf/config.json", "trainer_state.json", "config.yaml"}
    assert "sha256" not in manifest["engine/model.pt"] and "sha256" in manifest["trainer_state.json"]
    verify_checkpoint(d)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000007"]   # no temp dir left


def test_a_failed_save_leaves_no_step_directory(tmp_path):
    def parts(paths):
        paths.engine.mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, TrainerState(step=3), parts)
    assert not checkpoint_dir(tmp_path, 3).exists() and list_checkpoints(tmp_path) == []
    assert latest_verified(tmp_path) == (None, [])


@pytest.mark.parametrize("damage, bad_file", [
    (lambda d: (d / "engine" / "model.pt").write_bytes(b"x" * 100), "engine/model.pt"),        # truncated weights
    (lambda d: __import__("shutil").rmtree(d / "engine"), "engine/model.pt"),                  # deleted engine/
    (lambda d: (d / "trainer_state.json").write_text('{"step": 8, "rng"'), "trainer_state.json"),  # torn state
    (lambda d: (d / "hf" / "config.json").write_text("[]"), "hf/config.json"),                 # same size? no: altered
    (lambda d: (d / "manifest.json").unlink(), "manifest.json"),                               # never completed
])
def test_damage_is_detected_and_names_the_file(tmp_path, damage, bad_file):
    d = _save(tmp_path, 4)
    damage(d)
    with pytest.raises(CheckpointError) as ei:
        verify_checkpoint(d)
    assert str(d / bad_file) in str(ei.value) and "\n" not in str(ei.value)


def test_latest_verified_skips_damaged_newer_checkpoints_and_says_why(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    d6 = _save(tmp_path, 6)
    (d6 / "engine" / "model.pt").write_bytes(b"")
    half = checkpoint_dir(tmp_path, 8)
    (half / "engine").mkdir(parents=True)                # a directory that never got a manifest
    (tmp_path / "checkpoints" / "step_000010.old").mkdir()  # not a checkpoint name
    found, skipped = latest_verified(tmp_path)
    assert found == checkpoint_dir(tmp_path, 4)
    assert [p.name for p, _ in skipped] == ["step_000008", "step_000006"]
    assert "manifest.json: missing" in skipped[0][1] and "truncated" in skipped[1][1]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 6, 8]


def test_resave_replaces_a_checkpoint_of_the_same_step(tmp_path):
    d = _save(tmp_path, 5, wandb_run_id="old")
    (d / "engine" / "garbage").write_text("old")
    _save(tmp_path, 5, wandb_run_id="new")
    assert not (d / "engine" / "garbage").exists() and load_trainer_state(d).wandb_run_id == "new"
    verify_checkpoint(d)


def test_atomic_write_failure_keeps_previous_state(tmp_path, monkeypatch):
    d = _save(tmp_path, 1)
    before = (d / "trainer_state.json").read_text()

    def boom(*a, **k):
        raise OSError("crash during rename")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError):
        ck.atomic_write_json(d / "trainer_state.json", {"step": 999})
    assert (d / "trainer_state.json").read_text() == before


def test_rotation_keeps_last_n_verified_and_removes_dead_leftovers(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    rotated = checkpoint_dir(tmp_path, 2)                                # verified; rotated out
    (checkpoint_dir(tmp_path, 0)).mkdir()                                # unverified, older than newest
    newer = checkpoint_dir(tmp_path, 9)
    newer.mkdir()                                                        # newer unverified: left for inspection
    dead_tmp = tmp_path / "checkpoints" / ".tmp-step_000005-999999999"  # a save whose process is gone
    dead_tmp.mkdir()
    _save(tmp_path, 4, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 9]
    assert not checkpoint_dir(tmp_path, 0).exists() and not rotated.exists() and not dead_tmp.exists()
    assert newer.exists()
    assert rotate_checkpoints(tmp_path, 5) == []
    with pytest.raises(ValueError):
        rotate_checkpoints(tmp_path, 0)


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
    d = save_checkpoint(tmp_path, TrainerState(step=1, rng=capture_rng_state()), _parts)
    want = torch.rand(2)
    torch.manual_seed(1)
    restore_rng_state(load_trainer_state(d).rng)
    assert torch.equal(torch.rand(2), want)

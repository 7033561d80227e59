"""DeepSpeed's CPU shared-memory leftovers: what a new learner removes, and what it must leave alone."""

import mmap
import os
import sys
import time
from pathlib import Path

from rlmem.learner.deepspeed_shm import (
    clear_stale_build_lock, mapped_paths, private_build_dir, release_own_buffers, sweep_stale_buffers,
)


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_sweep_removes_only_old_buffers_no_process_maps(tmp_path):
    old = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40000_0"     # an ended learner's
    live = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40001_0"    # a running learner's
    fresh = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40002_0"   # just created, not mapped yet
    other = tmp_path / "someone_elses_segment"
    for p in (old, live, fresh, other):
        p.write_bytes(b"\0" * 4096)
    for p in (old, live, other):
        _age(p, 3600)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        assert str(live) in mapped_paths()
        assert sweep_stale_buffers(tmp_path, min_age_s=60) == [old]
        m[0] = 1                                      # the live mapping still works
    assert not old.exists() and live.exists() and fresh.exists() and other.exists()
    assert sweep_stale_buffers(tmp_path / "missing") == []


def test_a_build_lock_is_cleared_only_when_older_than_any_build(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    assert clear_stale_build_lock(tmp_path, max_age_s=600) is None and lock.exists()   # a build in progress
    _age(lock, 3600)
    assert clear_stale_build_lock(tmp_path, max_age_s=600) == lock and not lock.exists()
    assert clear_stale_build_lock(tmp_path) is None                                      # nothing to clear


def test_an_ending_learner_unlinks_the_buffers_it_maps_and_nothing_else(tmp_path):
    mine = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40000_0"
    peer = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_40001_0"   # another run's, not mapped here
    other = tmp_path / "not_deepspeed"
    for p in (mine, peer, other):
        p.write_bytes(b"\0" * 4096)
    with open(mine, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m, \
            open(other, "r+b") as g, mmap.mmap(g.fileno(), 4096):
        assert release_own_buffers(tmp_path) == [mine]
        m[0] = 1                                      # still mapped and usable until the process ends
        assert m[0] == 1
    assert not mine.exists() and peer.exists() and other.exists()
    assert release_own_buffers(tmp_path, maps=tmp_path / "no-such-maps") == []


def test_each_install_builds_the_shm_op_in_its_own_directory(monkeypatch):
    assert private_build_dir({"TORCH_EXTENSIONS_DIR": "/x"}) is None          # the user's choice stands
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    assert private_build_dir({}) is None                                       # not a venv: torch's default
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    if os.access(sys.prefix, os.W_OK):
        assert private_build_dir({}) == Path(sys.prefix) / "torch_extensions"

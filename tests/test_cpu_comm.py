"""DeepSpeed's CPU shared-memory leftovers: what a new learner removes, and what it must leave alone."""

import mmap
import os
import time

from rlmem.train.cpu_comm import clear_stale_build_lock, mapped_paths, sweep_stale_buffers


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

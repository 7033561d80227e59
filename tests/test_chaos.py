"""Chaos over one short run (issue 11): SIGTERM mid-step, resume, kill -9 a rollout worker, resume,
corrupt the newest checkpoint, resume. Every log holds each step exactly once, the final weights
equal an uninterrupted run's, and no process the runs started is left behind.

It runs with trainer.max_staleness 1, so rollouts are in flight whenever the run is stopped and the
checkpoints must carry them. The on-policy run (k = 0) takes the same signal, death and corruption
paths minus the in-flight records; its resume is covered by test_train_e2e (resume equals the
straight curve) and test_checkpoint (a corrupt checkpoint is skipped). Running it here too cost
CI about 170 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from train_helpers import hf_state, tiny_run_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOTAL = 4


def _config(tiny_model_dir, out: Path, staleness: int = 0) -> Path:
    k = (f"trainer.max_staleness={staleness}", "algorithm.clip_eps=0.2") if staleness else ()
    cfg = tiny_run_config(tiny_model_dir, out, f"trainer.total_steps={TOTAL}", "trainer.keep_last=null",
                          "logging.mask_image_every=0", *k,
                          eval={"source": "countdown-generated", "limit": 2, "num_samples": 1, "k": [1],
                                "eps": [0.5]},
                          trainer={"eval_every": 2})
    path = out.parent / f"{out.name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


STARTED: list["Train"] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """Whatever happens in the test, no run it started outlives it."""
    yield
    for run in STARTED:
        for p in [*run.seen.values(), psutil.Process(run.proc.pid) if run.proc.poll() is None else None]:
            if p is not None and p.is_running():
                p.kill()
    STARTED.clear()


class Train:
    """``rlmem train`` in a subprocess; remembers every process it started (Ray included)."""

    def __init__(self, config: Path, *overrides: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
        n = len(STARTED)
        self.out_path, self.err_path = config.with_suffix(f".{n}.out"), config.with_suffix(f".{n}.err")
        self.proc = subprocess.Popen([sys.executable, "-m", "rlmem.cli", "train", str(config), *overrides],
                                     cwd=REPO, env=env, stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"))
        self.seen: dict[int, psutil.Process] = {}
        STARTED.append(self)

    def snapshot(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update({p.pid: p for p in kids})
        return kids

    def wait_for(self, path: Path, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, f"run ended early:\n{self.err_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{path} never appeared"
            self.snapshot()
            time.sleep(0.2)
        self.snapshot()

    def finish(self, timeout: float = 900) -> tuple[int, str, str]:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.out_path.read_text(), self.err_path.read_text()

    def leftovers(self) -> list[str]:
        """Processes this run started that are still alive a little after it ended."""
        deadline = time.monotonic() + 30
        while True:
            alive = [p for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                return [" ".join(p.cmdline()[:3]) for p in alive]
            time.sleep(0.5)


def _steps(path: Path) -> list[int]:
    return [json.loads(l)["step"] for l in path.read_text().splitlines()] if path.exists() else []


def _manifest(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}" / "manifest.json"


def test_sigterm_kill_and_corruption_leave_one_consistent_run(tiny_model_dir, tmp_path, staleness=1):
    out = tmp_path / "run"
    config = _config(tiny_model_dir, out, staleness)

    # 1. SIGTERM in the middle of step 2: the SIGINT path, exit 143, last checkpoint named
    run = Train(config)
    run.wait_for(_manifest(out, 1))
    run.proc.send_signal(signal.SIGTERM)
    code, _, err = run.finish()
    assert code == 143, err[-3000:]
    assert "interrupted (SIGTERM) during step 2; last complete checkpoint: " in err and "step_000001" in err
    assert "Traceback" not in err and "Fatal Python error" not in err
    assert run.leftovers() == []
    assert not (out / ".rlmem.lock").exists()

    # 2. resume; kill -9 the rollout worker during step 3: named, exit 1
    run = Train(config)
    run.wait_for(_manifest(out, 2))
    workers = [p for p in run.snapshot() if "RolloutWorker" in " ".join(p.cmdline())]
    assert workers, [" ".join(p.cmdline()[:2]) for p in run.seen.values()]
    for w in workers:
        w.send_signal(signal.SIGKILL)
    code, stdout, err = run.finish()
    assert code == 1, err[-3000:]
    assert "resume from" in stdout and "step_000001" in stdout
    assert "rollout worker 0 died during step 3" in err and "step_000002; rerun" in err and "Traceback" not in err
    assert run.leftovers() == []

    # 3. resume to the end
    run = Train(config)
    code, stdout, err = run.finish()
    assert code == 0, err[-3000:]
    assert run.leftovers() == []

    # 4. corrupt the newest checkpoint's weights; auto-resume skips it, saying why, and redoes step 4
    newest = out / "checkpoints" / f"step_{TOTAL:06d}"
    big = max((p for p in (newest / "engine").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)
    run = Train(config)
    code, stdout, err = run.finish()
    assert code == 0, err[-3000:]
    assert f"skipped newer step_{TOTAL:06d}: {big}" in stdout and "truncated" in stdout
    assert f"resume from {out / 'checkpoints' / f'step_{TOTAL - 1:06d}'}" in stdout
    assert run.leftovers() == []

    # every log holds each step exactly once
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    assert Counter(_steps(out / "samples.jsonl")) == {s: 2 for s in range(1, TOTAL + 1)}
    assert Counter(_steps(out / "eval.jsonl")) == {2: 2, 4: 2}     # eps 0 and 0.5 at steps 2 and 4

    # the final weights equal an uninterrupted run's
    straight = tmp_path / "straight"
    run = Train(_config(tiny_model_dir, straight, staleness))
    code, _, err = run.finish()
    assert code == 0, err[-3000:]
    a, b = hf_state(out / "checkpoints" / f"step_{TOTAL:06d}" / "hf"), hf_state(straight / "checkpoints" /
                                                                              f"step_{TOTAL:06d}" / "hf")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert _steps(straight / "metrics.jsonl") == [1, 2, 3, 4]
    ra = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    rb = {r["step"]: r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())}
    for s in range(1, TOTAL + 1):
        assert ra[s]["reward/mean"] == pytest.approx(rb[s]["reward/mean"], abs=1e-9), s
    assert yaml.safe_load((out / "config.yaml").read_text())["eviction"]["eps"] == 0.5
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_staleness"] == staleness
    if staleness:   # the resumed legs took steps 3 and 4's rollouts from checkpoints 2 and 3
        assert all((out / "checkpoints" / f"step_{s:06d}" / "inflight" / f"step_{s + 1:06d}.jsonl").is_file()
                   for s in (2, 3))
        assert [ra[s]["rollout/staleness_mean"] for s in range(1, TOTAL + 1)] == [0.0, 1.0, 1.0, 1.0]

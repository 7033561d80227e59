"""`ray job submit` of a short run to a local head started with token auth (the launch docs' path).

The head runs as ``ray start --head --block`` in its own session and is stopped by signalling that
session, not with ``ray stop`` (which would stop every Ray instance of this user on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from rlmem.ports import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _ray_cli() -> str | None:
    venv_ray = Path(sys.executable).parent / "ray"
    return str(venv_ray) if venv_ray.exists() else shutil.which("ray")


def _stop_session(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's session (ray start cleans up its children), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        break
    # Ray daemons of *this* head (they carry its temp dir on their command line) that left the session.
    out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_ray_job_submit_runs_a_training_step(tmp_path):
    ray_cli = _ray_cli()
    if ray_cli is None:
        pytest.skip("the ray CLI is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")     # short: Ray's socket paths have a length limit
    gcs, dash = free_port(), free_port()
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--include-dashboard", "true", "--num-cpus", "2",
         "--port", str(gcs), "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "run"
    job_id = f"rlmem-test-{os.getpid()}"
    try:
        deadline = time.monotonic() + 90
        while True:   # the job server is up once `ray job list` answers
            r = subprocess.run([ray_cli, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert head.poll() is None, f"ray start failed: {head.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"the Ray head did not come up: {r.stderr[-2000:]}"
            time.sleep(1)
        entry = [sys.executable, "-m", "rlmem.cli", "train", "configs/countdown-tiny.yaml",
                 "trainer.total_steps=1", f"output_dir={out}", "algorithm.prompts_per_step=2",
                 "algorithm.rollouts_per_prompt=2", "rollout.max_new_tokens=24", "eviction.delta=8",
                 "learner.micro_batch_size=2", "logging.wandb.mode=offline", "logging.progress_bar=false"]
        sub = subprocess.run([ray_cli, "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id,
                              "--working-dir", str(REPO), "--runtime-env", "launch/runtime_env.yaml", "--", *entry],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stderr[-3000:]
        deadline = time.monotonic() + 400
        status = ""
        while time.monotonic() < deadline:
            status = subprocess.run([ray_cli, "job", "status", "--address", address, job_id], env=env,
                                    capture_output=True, text=True).stdout
            if any(s in status.lower() for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(2)
        logs = subprocess.run([ray_cli, "job", "logs", "--address", address, job_id], env=env,
                              capture_output=True, text=True).stdout
        assert "succeeded" in status.lower(), f"job status: {status}\n--- logs ---\n{logs[-4000:]}"
        assert f"[rlmem] metrics:     {out / 'metrics.jsonl'}" in logs
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1] and rows[0]["replay/max_abs_logprob_diff"] <= 1e-4   # steps are 1-based
        assert (out / "checkpoints" / "step_000001" / "trainer_state.json").is_file()
        assert (out / "checkpoints" / "step_000001" / "hf" / "config.json").is_file()
    finally:
        _stop_session(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

"""``rlmem doctor`` and ``scripts/gpu_check.sh``: the CPU run, a broken install, the dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


def doctor(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlmem.cli", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_doctor_on_cpu_runs_the_cpu_checks_and_lists_each_gpu_check_as_skipped(tmp_path):
    proc = doctor("--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "doctor.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["complete"] is True and set(c["status"] for c in checks.values()) == {"passed", "skipped"}
    cpu = [c for n, c in checks.items() if n.startswith(("cpu:", "install:"))]
    gpu = [c for n, c in checks.items() if n.startswith("gpu:")]
    assert len(cpu) == 5 and all(c["status"] == "passed" for c in cpu)
    assert len(gpu) == 5 and all(c["status"] == "skipped" and c["reason"] == NO_CUDA for c in gpu)
    names = " ".join(checks)
    for what in ("FlexAttention replay forward+backward", "CUDA IPC", "R1-Distill-1.5B shape, 8 x 4K",
                 "every gpu-marked test", "ZeRO 0 and 2 with the KL reference", "rollouts on CUDA replayed"):
        assert what in names, what
    replay = checks["cpu: torch-engine rollout replayed exactly (fp32)"]["figures"]
    assert replay["rounds"] > 0 and replay["max_token_diff"] < 1e-4 and replay["max_eviction_diff"] < 1e-4
    flex = checks["cpu: FlexAttention replay forward = dense SDPA"]["figures"]
    assert flex["max_token_diff"] < 1e-4 and flex["max_eviction_diff"] < 1e-4
    step = checks["cpu: DeepSpeed learner step (ZeRO 0, KL reference)"]["figures"]
    assert step["parameters_moved"] == step["parameters"] > 0 and step["replay_max_diff"] < 1e-4
    env = report["environment"]
    assert env["cuda_available"] is False and env["devices"] == []
    assert env["packages"]["torch"] and env["packages"]["deepspeed"] and env["packages"]["vllm"]
    ops = report["deepspeed_ops"]
    assert ops["accelerator"] == "cpu" and {"installed", "compatible"} == set(next(iter(ops["ops"].values())))
    assert report["vllm"]["platform"] == "cpu" and report["vllm"]["dtype"] == "float32"
    md = (tmp_path / "report" / "doctor.md").read_text()
    assert "| check | status | reason | seconds |" in md and f"| skipped | {NO_CUDA} |" in md
    assert "5 passed, 0 failed, 5 skipped" in proc.stdout


def test_doctor_names_a_broken_deepspeed(tmp_path):
    """``import deepspeed`` fails (a shim ahead on PYTHONPATH): the install check and the learner step
    fail naming it, the run exits 1, and what does not need DeepSpeed still runs."""
    shim = tmp_path / "shim" / "deepspeed"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("simulated broken DeepSpeed")\n')
    proc = doctor("--only", "weight bucket", "--out", str(tmp_path / "r"),
                  env={"PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads((tmp_path / "r" / "doctor.json").read_text())["checks"]}
    install = checks["install: required packages import"]
    assert install["status"] == "failed" and install["reason"] == "deepspeed: ImportError: simulated broken DeepSpeed"
    step = checks["cpu: DeepSpeed learner step (ZeRO 0, KL reference)"]
    assert step["status"] == "failed" and step["reason"] == "cannot import deepspeed (ImportError: simulated broken DeepSpeed)"
    assert checks["cpu: weight bucket round trip"]["status"] == "passed"
    assert checks["cpu: FlexAttention replay forward = dense SDPA"]["reason"] == "not selected (--only 'weight bucket')"
    assert "FAILED install: required packages import: deepspeed: ImportError: simulated broken DeepSpeed" in proc.stdout


def test_doctor_out_must_be_a_directory(tmp_path):
    (tmp_path / "f").write_text("")
    proc = doctor("--out", str(tmp_path / "f"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --out {tmp_path / 'f'}: exists and is not a directory"
    for flag, value, low in (("--budget", "5", "60"), ("--bench-tokens", "100", "256")):
        proc = doctor(flag, value)
        assert proc.returncode == 2 and proc.stderr.strip().endswith(f"argument {flag}: must be >= {low} (got {value})")


def test_gpu_check_dry_run_says_what_it_would_install_and_run(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl"):
        (wheels / name).write_bytes(b"x" * 1000)
    run = lambda *a: subprocess.run(["bash", "scripts/gpu_check.sh", *a], cwd=ROOT, capture_output=True, text=True,
                                    timeout=60)
    proc = run("--dry-run", "--wheels", str(wheels), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "would install 2 wheels" in out and "deepspeed-0.19.8-py3-none-any.whl" in out
    assert f"pip install --no-index --no-deps --target {tmp_path / 'o'}/site-packages {wheels}/*.whl" in out
    assert f"PYTHONPATH={ROOT}:{tmp_path / 'o'}/site-packages " in out     # rlmem from this tree, then the wheels
    assert "-m rlmem.cli doctor --budget 440 --out" in out and f"report: {tmp_path / 'o'}/doctor.md" in out
    empty = tmp_path / "none"
    empty.mkdir()
    proc = run("--dry-run", "--wheels", str(empty))
    assert proc.returncode == 0 and "build them with: bash scripts/build_gpu_wheels.sh" in proc.stdout
    proc = run("--bogus")
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


def test_learner_bench_of_the_gpu_check_runs_its_steps(tiny_model_dir):
    """The realistic-shape benchmark's code on the CPU at a tiny shape (dense kernel: flex has no CPU backward)."""
    import torch

    from rlmem.commands.doctor import bench_learner
    from rlmem.eviction.policy import EvictionConfig
    from rlmem.models.loading import load_model

    model = load_model(tiny_model_dir, "float32")
    before = [p.detach().clone() for p in model.parameters()]
    f = bench_learner(model, 96, n_records=2, n_new=32, kernels=("sdpa",),
                      eviction=EvictionConfig(delta=16, eps=0.5, block_size=4, window=4))
    assert f["records"] == 2 and f["tokens"] == 96 and f["rounds"] == 2 * 2       # rounds at t = 64 and 80
    assert set(f["steps"]) == {"causal, sdpa", "replay, sdpa"}
    assert all(r["seconds"] > 0 and r["peak_gib"] is None for r in f["steps"].values())
    assert f["replay_vs_causal_sdpa"] > 0 and "flex_vs_dense_replay" not in f
    # a benchmark, not training: no optimizer step, the weights stay as they were
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gpu_tests_check_runs_the_gpu_marked_files_and_reads_their_results(tmp_path):
    """Without CUDA every gpu-marked test skips: the check passes, listing each with its skip reason."""
    from rlmem.commands.doctor import check_gpu_tests

    f = check_gpu_tests({"workdir": tmp_path, "no_gpu_tests": False, "deadline": None})
    assert {"tests/test_engine_replay.py", "tests/test_learner.py", "tests/test_vllm_units.py"} <= set(f["files"])
    assert "tests/test_doctor.py" not in f["files"]        # it names the marker but has no gpu test
    assert f["failed"] == 0 and f["passed"] == 0 and f["skipped"] == len(f["tests"]) >= 5
    assert all(s == "skipped: needs CUDA" for s in f["tests"].values()), f["tests"]
    assert any("test_one_gpu_learner_step_with_the_kl_reference_on_the_device" in t for t in f["tests"])

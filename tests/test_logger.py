"""RunLogger: metrics.jsonl, offline W&B, W&B failures, sample table, replay-mask picture."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch

from rlmem.eviction.record import NEVER, RolloutRecord, peak_kv
from rlmem.figures import replay_mask_codes
from rlmem.run.logger import RunLogger, read_metrics, resolve_wandb_mode, summary_line, wandb_env_problem

STEP = {"reward/mean": 0.25, "eviction/peak_kv_mean": 12.5, "replay/max_abs_logprob_diff": 3e-6}


def _logger(tmp_path, **kw):
    kw.setdefault("wandb_mode", "disabled")
    return RunLogger(tmp_path / "run", total_steps=4, progress_bar=False, stream=io.StringIO(), **kw)


def _record() -> RolloutRecord:
    # prompt 4 + 6 completion tokens; δ=4, b=2, ε=0.5: rounds at t=4 (evict keys 0,1) and t=8
    # (6 alive keys, 3 blocks, keep eligible block 1 = keys 4,5 + protected 6,7; evict 2,3).
    layers4 = [{"num_blocks": 2, "kept": [], "logprob": 0.0}] * 2
    layers8 = [{"num_blocks": 3, "kept": [1], "logprob": -0.7}] * 2
    return RolloutRecord.from_dict({
        "prompt_ids": [1, 2, 3, 4], "completion_ids": [5, 6, 7, 8, 9, 10], "logprobs": [-1.0] * 6,
        "temperature": 0.9, "reward": 1.0,
        "eviction": {"delta": 4, "eps": 0.5, "block_size": 2, "window": 2, "protect_recent": 1,
                     "score_transform": "log", "tau": 1.0,
                     "rounds": [{"t": 4, "layers": layers4}, {"t": 8, "layers": layers8}]}})


def test_metrics_jsonl_rows(tmp_path):
    with _logger(tmp_path) as lg:
        lg.log(1, {**STEP, "loss/token": torch.tensor(0.5), "loss/eviction": float("nan")})
        lg.log(2, {**STEP, "reward/mean": 0.75})
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.25 and rows[1]["reward/mean"] == 0.75
    assert rows[0]["loss/token"] == 0.5 and rows[0]["loss/eviction"] is None   # strict JSON
    assert rows[0]["replay/max_abs_logprob_diff"] == 3e-6 and rows[0]["eviction/peak_kv_mean"] == 12.5
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_console_summary_and_missing_metric_warning(tmp_path):
    lg = _logger(tmp_path)
    lg.log(1, {"reward/mean": 0.5})
    lg.log(2, {"reward/mean": 0.5})
    out = lg.stream.getvalue()
    assert out.count("lack ['eviction/peak_kv_mean', 'replay/max_abs_logprob_diff']") == 1  # warned once
    assert "step 2/4 | reward 0.5" in out
    lg.close()
    assert summary_line(3, 10, {"loss/token": 1.5e-7, "perf/tokens_per_s": 2400.0}) == \
        "step 3/10 | L_tok 1.50e-07 | tok/s 2400"


def test_resume_appends_after_the_trimmed_rows_with_the_same_run_id(tmp_path):
    from rlmem.run.rundir import trim_logs

    with _logger(tmp_path, run_id="fixedid1") as lg:
        for s in range(1, 5):
            lg.log(s, STEP)
    trim_logs(tmp_path / "run", 2)   # what a resume from the step-2 checkpoint does first
    with _logger(tmp_path, run_id="fixedid1", start_step=2) as lg:
        assert lg.run_id == "fixedid1"
        lg.log(3, {**STEP, "reward/mean": 1.0})
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["reward/mean"] == 1.0


def test_offline_wandb_cannot_rewind_so_a_resume_past_logged_steps_gets_a_new_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with _logger(tmp_path, wandb_mode="offline", run_id="oldrun01", start_step=2, rewind=True) as lg:
        assert lg.run_id != "oldrun01" and lg.wandb_active
        assert "cannot rewind offline run oldrun01 to step 2" in lg.stream.getvalue()


def test_offline_wandb_writes_a_run_dir_and_resumes_same_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with _logger(tmp_path, wandb_mode="auto", config={"seed": 0}) as lg:
        assert lg.wandb_mode == "offline" and lg.wandb_active
        run_id = lg.run_id
        lg.log(1, STEP)
        lg.log_samples(1, [_record()], ["12+3"], prompts=["use 1 2 3"])
    runs = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob(f"run-{run_id}.wandb"))[0].stat().st_size > 0
    with _logger(tmp_path, wandb_mode="offline", run_id=run_id, start_step=1) as lg:
        lg.log(2, STEP)
    names = [p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*") if p.is_dir()]
    # a resume in the same second as the first run gets W&B's "-1" suffix; the run id is what matters
    assert len(names) >= 1 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in names), names


def test_wandb_init_failure_does_not_stop_the_run(tmp_path, monkeypatch):
    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    lg = _logger(tmp_path, wandb_mode="online")
    assert not lg.wandb_active
    lg.log(0, STEP)
    lg.close()
    out = lg.stream.getvalue()
    assert "W&B online start failed" in out and "retrying offline" in out and "W&B offline start failed" in out
    assert read_metrics(tmp_path / "run")[0]["reward/mean"] == 0.25


def test_wandb_log_failure_is_reported_once_and_disables_wandb(tmp_path, monkeypatch):
    class Run:
        finished = False

        def log(self, *a, **k):
            raise ConnectionError("gone")

        def finish(self, *a, **k):
            Run.finished = True

    import wandb

    monkeypatch.setattr(wandb, "init", lambda *a, **k: Run())
    lg = _logger(tmp_path, wandb_mode="offline")
    assert lg.wandb_active
    for s in range(3):
        lg.log(s, STEP)
    assert not lg.wandb_active and Run.finished
    assert lg.stream.getvalue().count("W&B log failed") == 1
    assert len(read_metrics(tmp_path / "run")) == 3
    lg.close()


def test_wandb_mode_resolution():
    assert resolve_wandb_mode("auto", {}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"


def test_blank_wandb_mode_counts_as_unset_and_a_wrong_one_is_named(tmp_path, monkeypatch):
    """``export WANDB_MODE=`` left W&B refusing to start (a pydantic fragment) and the run mirrored nothing."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", " ")
    assert wandb_env_problem() is None and resolve_wandb_mode("auto") == "offline"
    with _logger(tmp_path, wandb_mode="auto") as lg:
        assert lg.wandb_mode == "offline" and lg.wandb_active
        lg.log(1, STEP)
    assert "W&B" not in lg.stream.getvalue()      # no start-failure warning
    assert wandb_env_problem({"WANDB_MODE": "Offline"}) is None
    why = wandb_env_problem({"WANDB_MODE": "ofline"})
    assert why.startswith("WANDB_MODE='ofline' in the environment is not a W&B mode") and "unset it" in why


def test_peak_kv_and_sample_rows(tmp_path):
    rec = _record()
    assert peak_kv(rec) == 6       # 4 before t=4, 6 before t=8, {4..9} = 6 at the end
    rec.extra["peak_kv"] = 9
    assert peak_kv(rec) == 9       # engine-reported value wins
    lg = _logger(tmp_path, sample_table_size=1)
    rows = lg.log_samples(3, [_record().to_dict(), _record()], ["a", "b"])
    lg.close()
    assert rows == [{"step": 3, "prompt": None, "completion": "a", "reward": 1.0, "prompt_tokens": 4,
                     "completion_tokens": 6, "eps": 0.5, "rounds": 2, "peak_kv": 6}]
    saved = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert saved == rows


def test_replay_mask_codes_semantics():
    ev = torch.tensor([[3, NEVER, NEVER, NEVER]])  # key 0 evicted at round t=3
    codes, idx = replay_mask_codes(ev)
    assert idx.tolist() == [0, 1, 2, 3]
    assert codes[0].tolist() == [[2, 0, 0, 0],
                                 [2, 2, 0, 0],
                                 [2, 2, 2, 0],
                                 [1, 2, 2, 2]]
    big, idx = replay_mask_codes(torch.full((2, 2000), NEVER), max_side=100)
    assert big.shape == (2, 100, 100) and idx[0] == 0 and idx[-1] == 1999


def test_mask_image_shows_each_layers_replay_mask(tmp_path, saved_figures):
    """One panel per layer drawing that layer's replay mask; the PNG shows visible (blue) and
    evicted (orange) cells in about the proportions of the mask."""
    import numpy as np
    from matplotlib.image import imread

    from rlmem.eviction.record import evicted_at

    lg = _logger(tmp_path, mask_image_every=5)
    ea = evicted_at(_record())           # keys 0, 1 evicted at t=4, keys 2, 3 at t=8, in both layers
    assert ea[:, :4].tolist() == [[4, 4, 8, 8]] * 2 and (ea[:, 4:] == NEVER).all()
    path = lg.log_mask_image(ea, prompt_len=4, step=5)
    lg.close()
    assert path == tmp_path / "run" / "figures" / "mask_step_000005.png"
    [(fig, saved)] = saved_figures
    assert saved == path
    codes, _ = replay_mask_codes(ea)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and fig.texts[0].get_text().startswith("replay mask, step 5")
    for layer, ax in enumerate(panels):
        assert np.array_equal(ax.images[0].get_array(), codes[layer])
        assert ax.get_title() == f"layer {layer} (last query sees 6/10)"      # keys 4..9
    # pixels: the colours of visible and evicted cells, in the ratio of their counts (39 : 16 per layer:
    # keys 0, 1 are hidden from queries 4-9, keys 2, 3 from queries 8, 9)
    rgb = imread(path)[..., :3]

    def share(hex_colour):
        c = np.array([int(hex_colour[i: i + 2], 16) / 255 for i in (1, 3, 5)])
        return float((np.abs(rgb - c).max(axis=-1) < 0.02).mean())

    visible, evicted = int((codes == 2).sum()), int((codes == 1).sum())
    assert (visible, evicted) == (2 * 39, 2 * 16)
    assert share("#f4a582") > 0.01 and share("#2166ac") / share("#f4a582") == pytest.approx(39 / 16, rel=0.15)
    assert lg.should_log_mask(10) and not lg.should_log_mask(7)


def test_accuracy_vs_compression_plot(tmp_path, saved_figures):
    """eval.jsonl gets the result rows as given; the figure draws pass@1 (± its standard error)
    against peak-KV reduction, one series per method with its points in ε order, each policy
    point labelled with its ε, the full cache as one black star at 1x."""
    results = [{"method": "full", "eps": 0.0, "pass@1": 0.5, "pass@1_stderr": 0.05, "peak_kv_reduction": 1.0},
               {"method": "ngc", "eps": 0.5, "pass@1": 0.45, "pass@1_stderr": 0.04, "peak_kv_reduction": 1.9},
               {"method": "ngc", "eps": 0.25, "pass@1": 0.48, "pass@1_stderr": 0.03, "peak_kv_reduction": 1.3}]
    lg = _logger(tmp_path)
    p = lg.log_eval(50, results)
    lg.close()
    rows = [json.loads(l) for l in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["method"], r["eps"]) for r in rows] == [(50, "full", 0.0), (50, "ngc", 0.5), (50, "ngc", 0.25)]
    assert math.isclose(rows[1]["peak_kv_reduction"], 1.9)
    [(fig, saved)] = saved_figures
    assert saved == p and p.read_bytes()[:4] == b"\x89PNG"
    [ax] = fig.axes
    assert (ax.get_title(), ax.get_ylabel()) == ("accuracy vs compression, step 50", "pass@1")
    drawn = {c.get_label(): c.lines for c in ax.containers}
    assert sorted(drawn) == ["full", "ngc"]
    full, _, (full_bars,) = drawn["full"]
    assert (full.get_xdata().tolist(), full.get_ydata().tolist()) == ([1.0], [0.5])
    assert full.get_marker() == "*" and full.get_color() == "black"
    ngc, _, (bars,) = drawn["ngc"]
    assert (ngc.get_xdata().tolist(), ngc.get_ydata().tolist()) == ([1.3, 1.9], [0.48, 0.45])   # ε order
    assert [[round(v, 9) for v in seg[:, 1]] for seg in bars.get_segments()] == [[0.45, 0.51], [0.41, 0.49]]
    assert [[round(v, 9) for v in seg[:, 1]] for seg in full_bars.get_segments()] == [[0.45, 0.55]]
    assert sorted((t.get_text(), t.xy) for t in ax.texts) == [("ε=0.25", (1.3, 0.48)), ("ε=0.5", (1.9, 0.45))]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "ngc"]


def test_from_config_with_progress_bar(tmp_path, capsys):
    from rlmem.run.config import load_config

    cfg = load_config("configs/countdown-tiny.yaml", [f"output_dir={tmp_path}/r", "logging.wandb.mode=disabled"])
    with RunLogger.from_config(cfg, run_id="abcd1234", start_step=1) as lg:
        assert (lg.total_steps, lg.sample_table_size, lg.mask_image_every) == (
            cfg.trainer.total_steps, cfg.logging.sample_table_size, cfg.logging.mask_image_every)
        lg.log(1, STEP)
    cap = capsys.readouterr()
    assert f"step 1/{cfg.trainer.total_steps} | reward 0.25" in cap.out and "train" in cap.err   # summary on stdout, bar on stderr
    assert read_metrics(tmp_path / "r")[0]["step"] == 1


def test_log_every_thins_the_console_not_the_metrics_file(tmp_path):
    lg = _logger(tmp_path, log_every=3)     # 4 steps: console lines after steps 3 and 4 (the last)
    for s in range(1, 5):
        lg.log(s, STEP)
    out = lg.stream.getvalue()
    lg.close()
    assert [l.split("|")[0].strip() for l in out.splitlines() if l.startswith("step")] == ["step 3/4", "step 4/4"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]

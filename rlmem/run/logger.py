"""Run logging: ``metrics.jsonl``, Weights & Biases, a console progress bar, sample tables, pictures.

The local files are the source of truth and are always written; W&B is a mirror that must never
block or kill a run. Mode ``auto`` is online when ``WANDB_API_KEY`` is set and offline otherwise
(``WANDB_MODE`` in the environment wins); an online start that fails falls back to offline; any
later W&B error is reported once and W&B is switched off for the rest of the run.

Files under ``<output_dir>``: ``metrics.jsonl`` (one object per step, non-finite numbers as null),
``samples.jsonl`` (the sample-rollout table), ``eval.jsonl``, ``timeline.jsonl`` (when each actor ran
which phase: :mod:`rlmem.run.timeline`), ``figures/*.png``, ``wandb/``, and
with ``logging.records_every`` the full rollout records of every Nth step in
``records/step_NNNNNN.jsonl`` (rewards included; what ``rlmem inspect`` reads).
Every row carries ``step``, the 1-based number of the training step it belongs to. On resume from
the checkpoint of step S, :func:`rlmem.run.rundir.trim_logs` has already cut every file back to
``step <= S`` (and removed the record files of later steps); the W&B run is reopened with the same id and, when it had logged past S
(``rewind``), rewound to S (online; W&B cannot rewind an offline run, which then continues under a
new id in the same group, named in the console).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rlmem.eviction.record import peak_kv, write_jsonl

RECORDS_DIR = "records"


def records_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where a run keeps the rollout records of ``step`` (``logging.records_every``)."""
    return Path(output_dir) / RECORDS_DIR / f"step_{int(step):06d}.jsonl"
from rlmem.figures import plot_accuracy_vs_reduction, plot_replay_mask, plot_timeline
from rlmem.run.timeline import TIMELINE_FILE

log = logging.getLogger("rlmem.run.logger")

# Keys every step should carry (the driver's contract; a missing one is reported once).
REQUIRED_METRICS = ("reward/mean", "eviction/peak_kv_mean", "replay/max_abs_logprob_diff")

# (metric key, short label) shown in the one-line console summary, when present.
SUMMARY_KEYS = (
    ("reward/mean", "reward"), ("accuracy/mean", "acc"), ("response_length/mean", "len"),
    ("eviction/eps", "eps"), ("eviction/peak_kv_mean", "peakKV"), ("eviction/kv_saving_vs_own_length", "kv÷own"),
    ("loss/token", "L_tok"), ("loss/eviction", "L_evict"), ("token/kl_ref_mean", "KLref"),
    ("optim/grad_norm", "|g|"),
    ("replay/max_abs_logprob_diff", "Δlogp"), ("perf/tokens_per_s", "tok/s"), ("time/step_s", "s/step"),
)


def new_run_id() -> str:
    """An 8-character id in W&B's alphabet; made here so it exists even when W&B is off."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


ENV_WANDB_MODES = ("online", "offline", "disabled", "dryrun")   # what ``$WANDB_MODE`` may say here


def wandb_env_problem(env: dict[str, str] | None = None) -> str | None:
    """Why ``$WANDB_MODE`` cannot be used, or None. W&B validates it itself (whatever mode is passed)
    and fails with a pydantic fragment, so the run checks it first (``rlmem.run.preflight``)."""
    env = os.environ if env is None else env
    raw = env.get("WANDB_MODE")
    if raw is None or not raw.strip() or raw.strip().lower() in ENV_WANDB_MODES:
        return None
    return (f"WANDB_MODE={raw!r} in the environment is not a W&B mode: set it to online, offline or "
            f"disabled, or unset it (then logging.wandb.mode decides)")


def resolve_wandb_mode(mode: str, env: dict[str, str] | None = None) -> str:
    """``auto`` -> ``$WANDB_MODE`` if set (blank counts as unset), else online with ``WANDB_API_KEY``,
    else offline."""
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode in ENV_WANDB_MODES:
        return "offline" if env_mode == "dryrun" else env_mode
    return "online" if env.get("WANDB_API_KEY") else "offline"


def to_jsonable(x: Any) -> Any:
    """Tensors/NumPy to Python numbers and lists; NaN and ±inf to None (strict JSON)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


class RunLogger:
    """One per run, in the driver process. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int,
        wandb_project: str = "rlmem",
        wandb_entity: str | None = None,
        wandb_mode: str = "auto",
        run_name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
        start_step: int = 0,
        rewind: bool = False,
        progress_bar: bool = True,
        sample_table_size: int = 8,
        mask_image_every: int = 10,
        records_every: int = 0,
        log_every: int = 1,
        stream=None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.figures_dir = self.output_dir / "figures"
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.samples_path = self.output_dir / "samples.jsonl"
        self.eval_path = self.output_dir / "eval.jsonl"
        self.total_steps = total_steps
        self.run_id = run_id or new_run_id()
        self.sample_table_size = sample_table_size
        self.mask_image_every = mask_image_every
        self.records_every = records_every
        self.records_dir = self.output_dir / RECORDS_DIR
        self.log_every = max(1, log_every)
        self.stream = stream if stream is not None else sys.stdout
        self._warned: set[str] = set()
        self._t_last = time.monotonic()
        self._bar = None
        self.wandb_mode = resolve_wandb_mode(wandb_mode)
        self._wandb = None
        if self.wandb_mode != "disabled":
            kw = dict(project=wandb_project, entity=wandb_entity, name=run_name, group=group,
                      tags=list(tags) or None, config=config)
            if rewind and run_id and self.wandb_mode == "online":
                kw["resume_from"] = f"{run_id}?_step={int(start_step)}"
            elif rewind and run_id:
                self.run_id = new_run_id()
                kw["group"] = group or f"rlmem-{run_id}"
                self._warn("rewind", f"W&B cannot rewind offline run {run_id} to step {start_step}; "
                                     f"continuing as W&B run {self.run_id} in group {kw['group']!r}")
            self._wandb = self._init_wandb(kw)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, leave=True)

    @classmethod
    def from_config(cls, cfg, *, run_id: str | None = None, start_step: int = 0, rewind: bool = False,
                    **kw) -> "RunLogger":
        """Build from a :class:`~rlmem.run.config.RunConfig` (the resolved config goes to W&B)."""
        w = cfg.logging.wandb
        return cls(cfg.output_dir, total_steps=cfg.trainer.total_steps, wandb_project=w.project,
                   wandb_entity=w.entity, wandb_mode=w.mode, run_name=w.run_name, group=w.group, tags=w.tags,
                   config=cfg.model_dump(mode="json"), run_id=run_id, start_step=start_step, rewind=rewind,
                   progress_bar=cfg.logging.progress_bar, sample_table_size=cfg.logging.sample_table_size,
                   mask_image_every=cfg.logging.mask_image_every, records_every=cfg.logging.records_every,
                   log_every=cfg.trainer.log_every, **kw)

    # -- W&B plumbing ---------------------------------------------------------------------------

    @property
    def wandb_active(self) -> bool:
        return self._wandb is not None

    def _init_wandb(self, kwargs: dict[str, Any]):
        try:
            import wandb
        except Exception as e:  # noqa: BLE001 - a broken install must not stop training
            self._warn("import", f"W&B unavailable ({e!r}); logging to {self.metrics_path} only")
            return None
        if not os.environ.get("WANDB_MODE", "x").strip():
            del os.environ["WANDB_MODE"]   # blank means unset here; W&B would reject it whatever mode it is given
        modes = [self.wandb_mode] + (["offline"] if self.wandb_mode == "online" else [])
        for mode in modes:
            resume = {} if "resume_from" in kwargs and mode == "online" else {"id": self.run_id, "resume": "allow"}
            if mode != "online":
                kwargs = {k: v for k, v in kwargs.items() if k != "resume_from"}
            try:
                return wandb.init(**resume, dir=str(self.output_dir), mode=mode,
                                  settings=wandb.Settings(init_timeout=90, console="off", silent=True),
                                  reinit="create_new", **kwargs)
            except Exception as e:  # noqa: BLE001
                nxt = "; retrying offline" if mode == "online" else f"; logging to {self.metrics_path} only"
                self._warn(f"init-{mode}", f"W&B {mode} start failed ({e!r}){nxt}")
        return None

    def _wb(self, what: str, fn, *args, **kwargs) -> None:
        if self._wandb is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._warn("wandb", f"W&B {what} failed ({e!r}); continuing without W&B")
            self._disable_wandb()

    def _disable_wandb(self) -> None:
        run, self._wandb = self._wandb, None
        try:
            run.finish(quiet=True)
        except Exception:  # noqa: BLE001
            pass

    def _warn(self, key: str, msg: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(msg)
        self.print(f"[rlmem] warning: {msg}")

    def print(self, line: str) -> None:
        """Print a line to the console without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    # -- per-step metrics -----------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl, mirror to W&B, advance the bar.

        ``step`` is the 1-based number of the step just finished (the ``TrainerState.step`` of a
        checkpoint taken now).
        """
        now = time.monotonic()
        row = {"step": int(step), **{k: to_jsonable(v) for k, v in metrics.items()}, "time/wall": time.time()}
        missing = [k for k in REQUIRED_METRICS if k not in row]
        if missing:
            self._warn("missing", f"step metrics lack {missing} (expected every step)")
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._wandb is not None:
            self._wb("log", self._wandb.log, numeric, step=int(step))
        if self._bar is not None:
            self._bar.n = min(int(step), self.total_steps)
            self._bar.refresh()
        if int(step) % self.log_every == 0 or int(step) == self.total_steps:   # the console line; the file gets every step
            self.print(summary_line(step, self.total_steps, row, now - self._t_last))
            self._t_last = now
        return row

    # -- sample rollouts ------------------------------------------------------------------------

    def log_samples(self, step: int, records: Sequence[Any], texts: Sequence[str],
                    prompts: Sequence[str] | None = None, num_layers: int | None = None) -> list[dict[str, Any]]:
        """A table of up to ``sample_table_size`` rollouts with their eviction stats.

        ``records`` are :class:`~rlmem.eviction.record.RolloutRecord` or their dicts, ``texts`` the
        decoded completions (same order), ``prompts`` the decoded prompts. Written to samples.jsonl
        and as a W&B table.
        """
        rows = []
        for i, (rec, text) in enumerate(zip(records, texts)):
            if i >= self.sample_table_size:
                break
            rows.append({"step": int(step), "prompt": prompts[i] if prompts is not None else None,
                         "completion": text, **record_stats(rec, num_layers)})
        if not rows:
            return rows
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps(to_jsonable(r), allow_nan=False) + "\n")
        if self._wandb is not None:
            def _table():
                import wandb

                cols = list(rows[0])
                table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
                self._wandb.log({"samples": table}, step=int(step))
            self._wb("table", _table)
        return rows

    def should_log_records(self, step: int) -> bool:
        return self.records_every > 0 and step % self.records_every == 0

    def log_records(self, step: int, records: Sequence[Any]) -> Path:
        """Every rollout of ``step`` as a record (rewards set), replacing the file atomically, so a
        step run again after a resume overwrites its own file and nothing else.

        Step ``N``'s rollouts are sampled before its update, by the weights after step ``N - 1``
        (``checkpoints/step_{N-1}/hf``, the starting model for step 1): each record says so in
        ``sampled_by_step``, which ``rlmem replay-check`` reads to name the model to replay with. With
        ``trainer.max_staleness: k`` the weights are older: those after step ``max(0, N - 1 - k)``
        (docs/design.md section 5)."""
        for r in records:   # the driver sets it as the rollout is generated; under max_staleness it is older
            r.extra.setdefault("sampled_by_step", int(step) - 1)
        path = records_path(self.output_dir, step)
        write_jsonl(path, records)
        return path

    # -- timeline -------------------------------------------------------------------------------

    def log_timeline(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append spans (:func:`rlmem.run.timeline.span` rows) to timeline.jsonl."""
        if not rows:
            return
        with open(self.output_dir / TIMELINE_FILE, "a") as f:
            for r in rows:
                f.write(json.dumps(to_jsonable(r), allow_nan=False) + "\n")

    def draw_timeline(self, step: int) -> Path | None:
        """Draw timeline.jsonl (every step so far) to ``figures/timeline.png`` and W&B; None if empty."""
        from rlmem.jsonl import iter_json_lines

        path = self.output_dir / TIMELINE_FILE
        if not path.exists():
            return None
        rows = [r for _, r in iter_json_lines(path, objects=False, torn="skip") if isinstance(r, dict)]
        if not rows:
            return None
        out = self.figures_dir / "timeline.png"
        plot_timeline(rows, out, title=f"timeline: spans per actor, steps 1-{int(step)}")
        self._log_image("time/timeline", out, step)
        return out

    # -- pictures -------------------------------------------------------------------------------

    def should_log_mask(self, step: int) -> bool:
        return self.mask_image_every > 0 and step % self.mask_image_every == 0

    def log_mask_image(self, evicted_at, prompt_len: int, step: int, title: str | None = None) -> Path:
        """Draw the per-layer replay mask of one rollout to ``figures/mask_step_{step:06d}.png`` and W&B."""
        path = self.figures_dir / f"mask_step_{int(step):06d}.png"
        plot_replay_mask(evicted_at, prompt_len, path, title=title or f"replay mask, step {step}")
        self._log_image("eviction/replay_mask", path, step)
        return path

    def log_eval(self, step: int, results: list[dict[str, Any]]) -> Path:
        """Append eval result rows (one per run: full, then the policy at each ε; the rows of
        :func:`rlmem.evaluation.pipeline.result_rows`) to eval.jsonl; plot pass@1 against peak-KV
        reduction. The numbers themselves reach metrics.jsonl and W&B with the step's metrics
        (:func:`rlmem.train.rollouts.eval_metrics`)."""
        with open(self.eval_path, "a") as f:
            for r in results:
                f.write(json.dumps(to_jsonable({"step": int(step), **r}), allow_nan=False) + "\n")
        path = self.figures_dir / f"accuracy_vs_compression_step_{int(step):06d}.png"
        plot_accuracy_vs_reduction(results, path, title=f"accuracy vs compression, step {step}")
        self._log_image("eval/accuracy_vs_compression", path, step)
        return path

    def _log_image(self, key: str, path: Path, step: int) -> None:
        if self._wandb is None:
            return

        def _img():
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=int(step))
        self._wb("image", _img)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wb("finish", self._wandb.finish)
            self._wandb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Helpers (pure; tested on their own)


def summary_line(step: int, total: int, row: dict[str, Any], dt: float | None = None) -> str:
    parts = [f"step {int(step)}/{total}"]
    for key, label in SUMMARY_KEYS:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{label} {_fmt(v)}")
    if dt is not None and "time/step_s" not in row:
        parts.append(f"{dt:.1f}s")
    return " | ".join(parts)


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4g}"
    return f"{v:.2e}"


def record_stats(rec: Any, num_layers: int | None = None) -> dict[str, Any]:
    """Reward, length and eviction stats of one rollout record (object or dict)."""
    from rlmem.eviction.record import RolloutRecord

    if not isinstance(rec, RolloutRecord):
        rec = RolloutRecord.from_dict(rec)
    cfg = rec.eviction_config
    return {"reward": rec.reward, "prompt_tokens": len(rec.prompt_ids), "completion_tokens": len(rec.completion_ids),
            "eps": cfg.eps if cfg is not None else 0.0, "rounds": rec.num_rounds,
            "peak_kv": peak_kv(rec, num_layers)}


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``<output_dir>/metrics.jsonl``."""
    p = Path(output_dir) / "metrics.jsonl"
    from rlmem.jsonl import iter_json_lines

    return [row for _, row in iter_json_lines(p)] if p.exists() else []


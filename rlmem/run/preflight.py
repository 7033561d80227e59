"""The checks of a run that need the environment, run by ``rlmem train`` before Ray starts and by
``rlmem config show`` (so a config that shows cleanly also starts): the rollout engine exists and
can run here, the model is reachable, the datasets load, the learner accepts its settings,
``$WANDB_MODE`` is one W&B accepts, and the run directory can be used as asked (:func:`rlmem.run.rundir.plan_start`).

Problems come back as ``(dotted key, one line)`` like the config's own checks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from rlmem.run.config import COUNTDOWN_GENERATED, RunConfig, looks_local


@dataclass
class Prepared:
    """What the checks loaded, so the driver does not load it twice."""

    train_examples: list[dict] = field(default_factory=list)
    eval_examples: list[dict] = field(default_factory=list)


def engine_problem(cfg: RunConfig) -> tuple[str, str] | None:
    """``rollout.backend`` must be a registered engine that can run on this machine."""
    from rlmem.engine.registry import engine_names, engine_unavailable_reason

    name = cfg.rollout.backend
    if name not in engine_names():
        return ("rollout.backend", f"unknown engine {name!r}; registered engines: {', '.join(engine_names())}")
    why = engine_unavailable_reason(name)
    if why is not None:
        return ("rollout.backend", f"engine {name!r} cannot run here: {why}")
    if name == "vllm":
        from rlmem.engine.vllm.engine import check_block_size, check_eviction, cuda_present

        try:
            check_block_size(cfg.eviction.block_size, cuda=cuda_present())
            check_eviction(cfg.eviction_config(cfg.eviction.eps or 0.5), cfg.eviction.block_size)
        except ValueError as e:
            return ("rollout.backend", f"vllm: {e}")
        if cfg.rollout.vllm.tensor_parallel_size > 1:
            return ("rollout.vllm.tensor_parallel_size", "the rlmem vLLM engine runs one process per engine "
                    "(its scheduler and worker hooks share it); use 1 and more rollout.num_workers")
    return None


def hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_problem(cfg: RunConfig) -> tuple[str, str] | None:
    """A hub id must be in the local cache when the hub is offline (local paths: :mod:`..checks`)."""
    path = cfg.model.path
    if cfg.model.is_tiny or looks_local(path) or not hub_offline():
        return None
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the hub raises several types for "not there"
        return ("model.path", f"hub model {path!r} is not in the local Hugging Face cache and the hub is offline "
                              f"(HF_HUB_OFFLINE); download it first (`huggingface-cli download {path}`) or set "
                              f"model.path to a local directory ({type(e).__name__})")
    return None


def resolve_model_path(cfg: RunConfig) -> str:
    """The local directory to load the policy from: the tiny model (made on first use, in the run
    directory), a local directory, or a hub id's snapshot (downloaded unless offline)."""
    if cfg.model.is_tiny:
        out = cfg.tiny_model_dir
        if not (out / "config.json").exists():
            from rlmem.models.tiny import make_tiny_model

            t = cfg.model.tiny
            make_tiny_model(out, layers=t.layers, hidden=t.hidden, heads=t.heads, kv_heads=t.kv_heads, seed=t.seed)
        return str(out)
    if looks_local(cfg.model.path):
        return str(Path(cfg.model.path).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(cfg.model.path, local_files_only=hub_offline())


def load_data(cfg: RunConfig, prepared: Prepared) -> list[tuple[str, str]]:
    """Load the training and evaluation problems into ``prepared``; problems name the file and line."""
    from rlmem.data.stream import load_task_examples

    out = []
    for key, source, split, limit, dest in (("data.source", cfg.data.source, cfg.data.split, cfg.data.limit, "train"),
                                            ("eval.source", cfg.eval.source, cfg.eval.split, cfg.eval.limit, "eval")):
        if not source:
            continue
        try:
            examples = load_task_examples(source, split, limit, seed=cfg.seed,
                                          countdown=cfg.data.countdown if source == COUNTDOWN_GENERATED else None)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            msg = str(e).strip().strip('"').splitlines()[0] if str(e).strip() else type(e).__name__
            out.append((key, msg))
            continue
        if not examples:
            out.append((key, f"{source!r} (split {split!r}) gave no examples"))
        setattr(prepared, f"{dest}_examples", examples)
    return out


def learner_problem(cfg: RunConfig) -> tuple[str, str] | None:
    """The learner's own rules (:class:`~rlmem.learner.config.LearnerConfig`), with their key."""
    try:
        cfg.learner_config("<model>")
    except ValueError as e:
        m = re.match(r"([a-z_]+\.[a-z_]+): (.*)", str(e), re.S)
        return (m.group(1), m.group(2)) if m else ("learner", str(e))
    return None


def wandb_problem(cfg: RunConfig) -> tuple[str, str] | None:
    """An unusable ``$WANDB_MODE`` (W&B would refuse to start and the run would log to files only)."""
    from rlmem.run.logger import wandb_env_problem

    if cfg.logging.wandb.mode == "disabled":
        return None
    why = wandb_env_problem()
    return ("logging.wandb.mode", why) if why else None


def preflight(cfg: RunConfig, *, load: bool = True) -> tuple[Prepared, list[tuple[str, str]]]:
    """Every environment check; ``load=False`` skips loading the datasets."""
    prepared = Prepared()
    problems = [p for p in (engine_problem(cfg), model_problem(cfg), learner_problem(cfg), wandb_problem(cfg)) if p]
    if load:
        problems += load_data(cfg, prepared)
    return prepared, problems

"""Cross-field and file-system checks of a run config, as ``(dotted key, message)`` problems.

The schema validates each field; these rules involve several fields (batch sizes that divide, the
eviction rules of :class:`~rlmem.eviction.policy.EvictionConfig` for every ε the run can use) or
the disk (paths that must exist). Cheap and import-light; the checks that need the environment
(engine availability, model cache, datasets) are :func:`rlmem.run.preflight.preflight`.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlmem.learner.clip_rule import clip_problems
from rlmem.run.config.schema import COUNTDOWN_GENERATED, COUNTDOWN_TOY, RunConfig

def check_config(cfg: RunConfig, *, check_files: bool = True, source: str | None = None) -> list[tuple[str, str]]:
    """Problems that involve several fields or the file system, as ``(dotted key, message)``;
    ``source`` is the config file (a relative path that only exists beside it is named)."""
    out: list[tuple[str, str]] = []
    a, r, lr, ev = cfg.algorithm, cfg.rollout, cfg.learner, cfg.eviction
    samples = a.prompts_per_step * a.rollouts_per_prompt
    sz = f"{a.prompts_per_step} prompts x {a.rollouts_per_prompt} rollouts = {samples} samples per step"

    for key, name in [("data.reward", cfg.data.reward)] + [
            (f"data.shaping.{i}.name", sh.name) for i, sh in enumerate(cfg.data.shaping)]:
        try:
            from rewards import get_reward

            get_reward(name)
        except KeyError as e:
            out.append((key, str(e).strip('"')))
    if samples % r.num_workers:
        out.append(("rollout.num_workers", f"{sz} do not divide evenly over {r.num_workers} rollout workers"))
    if samples % a.mini_batches:
        out.append(("algorithm.mini_batches", f"{sz} do not split into {a.mini_batches} mini-batches"))
    else:
        per_opt = samples // a.mini_batches
        unit = lr.num_workers * lr.micro_batch_size
        if per_opt % unit:
            out.append(("learner.micro_batch_size",
                        f"{per_opt} samples per optimizer step are not divisible by learner.num_workers x "
                        f"learner.micro_batch_size = {lr.num_workers} x {lr.micro_batch_size} = {unit}"))
    out += clip_problems(a.clip_eps, a.clip_eps_high, mini_batches=a.mini_batches, ppo_epochs=a.ppo_epochs,
                         max_staleness=cfg.trainer.max_staleness)
    if a.rollouts_per_prompt < 2:
        out.append(("algorithm.rollouts_per_prompt", "must be >= 2: group advantages need at least two rollouts"))

    # Eviction: the rules live in EvictionConfig; build one per ε the run can use.
    base_ok = True
    try:
        cfg.eviction_config()
    except ValueError as e:
        out.append(eviction_problem(e))
        base_ok = False   # then every other ε would repeat the same complaint
    cur, intro = ev.curriculum, ev.interoception
    if cur.enabled:
        rates = cur.retention_rates
        if not rates:
            out.append(("eviction.curriculum.retention_rates", "must not be empty"))
        for i, rho in enumerate(rates):
            if not 0.0 < rho <= 1.0:
                why = "retention 0 would evict everything" if rho == 0.0 else f"must be in (0, 1] (got {rho})"
                out.append((f"eviction.curriculum.retention_rates.{i}", why))
        if any(x < y for x, y in zip(rates, rates[1:])):
            out.append(("eviction.curriculum.retention_rates", f"must be non-increasing (got {rates})"))
    if intro.enabled:
        if not intro.eps_choices:
            out.append(("eviction.interoception.eps_choices", "must not be empty"))
        for i, e in enumerate(intro.eps_choices if base_ok else []):
            try:
                cfg.eviction_config(e)
            except ValueError as err:
                out.append(eviction_problem(err, f"eviction.interoception.eps_choices.{i}"))
    last = 0
    for i, stage in enumerate(ev.stages):
        key = f"eviction.stages.{i}"
        if stage.from_step <= last:
            out.append((f"{key}.from_step", f"must be after the previous stage's ({last}): stages are in step order"))
        last = max(last, stage.from_step)
        if stage.eps is None and stage.tau is None:
            out.append((key, "sets neither eps nor tau"))
        if stage.eps is not None and (cur.enabled or intro.enabled):
            which = "eviction.curriculum" if cur.enabled else "eviction.interoception"
            out.append((f"{key}.eps", f"{which} sets ε itself; disable it or drop eps from the stage"))
        elif stage.eps and not ev.eps:
            # eviction.eps=0 reads as "a full-cache run"; a stage that evicts later would silently
            # turn that control into an eviction run from its step on (issue 22, item 3).
            out.append((f"{key}.eps", f"eviction.eps is 0 (a full-cache run) but this stage evicts at ε = {stage.eps:g} "
                                      f"from step {stage.from_step}: for a full-cache control drop the stages "
                                      f"(eviction.eps=0 'eviction.stages=[]'); for a full-cache start, set "
                                      f"eviction.eps to the rate and begin with a stage {{from_step: 1, eps: 0}}"))
        if base_ok:
            try:
                cfg.eviction_config(stage.eps, stage.tau)
            except ValueError as err:
                k, why = eviction_problem(err)
                out.append((f"{key}.{k.removeprefix('eviction.')}", why))
    for i, e in enumerate(cfg.eval.eps if base_ok else []):
        try:
            cfg.eviction_config(e)
        except ValueError as err:
            out.append(eviction_problem(err, f"eval.eps.{i}"))

    for key in ("rollout_resources", "learner_resources"):
        for name, amount in (getattr(cfg.ray, key) or {}).items():
            if name in ("CPU", "GPU", "memory"):
                out.append((f"ray.{key}.{name}", f"{name} is not a custom resource; use ray.num_cpus_per_actor / "
                                                 f"ray.num_gpus_per_actor"))
            elif amount <= 0:
                out.append((f"ray.{key}.{name}", f"must be > 0 (got {amount})"))
    out += placement_problems(cfg)
    for i, k in enumerate(cfg.eval.k):
        if k < 1 or k > cfg.eval.num_samples:
            out.append((f"eval.k.{i}", f"pass@{k} needs 1 <= k <= eval.num_samples ({cfg.eval.num_samples})"))
    if cfg.data.countdown.min_numbers > cfg.data.countdown.max_numbers:
        out.append(("data.countdown.min_numbers", "must be <= data.countdown.max_numbers"))
    if cfg.data.countdown.min_target > cfg.data.countdown.max_target:
        out.append(("data.countdown.min_target", "must be <= data.countdown.max_target"))
    t = cfg.model.tiny
    if cfg.model.is_tiny and (t.hidden % t.heads or t.hidden // t.heads != 64 or t.heads % t.kv_heads):
        out.append(("model.tiny", f"hidden/heads must be 64 and heads a multiple of kv_heads "
                                  f"(got hidden={t.hidden}, heads={t.heads}, kv_heads={t.kv_heads})"))
    if cfg.optimizer.warmup_steps > cfg.trainer.total_steps:
        out.append(("optimizer.warmup_steps", f"({cfg.optimizer.warmup_steps}) exceeds trainer.total_steps "
                                              f"({cfg.trainer.total_steps})"))
    if cfg.rollout.backend != "vllm" and r.vllm.tensor_parallel_size > 1:
        out.append(("rollout.vllm.tensor_parallel_size", "only applies to rollout.backend: vllm"))

    if check_files:
        out += check_files_exist(cfg, source)
    return out


def config_notes(cfg: RunConfig) -> list[tuple[str, str]]:
    """Settings that are valid but do nothing in this run, as ``(dotted key, message)``; printed by
    ``rlmem train`` and ``rlmem config show``, not refused.

    A stage beyond ``trainer.total_steps`` is one: the shipped toy config keeps stages 2 and 3 past
    its 60 steps on purpose (continue the run to 220 steps to reach them), and a short smoke run
    (``trainer.total_steps=2``) of any staged config would be refused if this were an error."""
    out = []
    total = cfg.trainer.total_steps
    for i, stage in enumerate(cfg.eviction.stages):
        if stage.from_step > total:
            out.append((f"eviction.stages.{i}.from_step",
                        f"{stage.from_step} lies beyond trainer.total_steps ({total}): this run ends before the "
                        f"stage starts (continue the run with a larger trainer.total_steps to reach it)"))
    return out


def placement_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Colocated on GPUs means rollout worker i and learner rank i share GPU i (docs/gpu.md)."""
    r, out = cfg.ray, []
    if r.placement == "colocated" and r.num_gpus_per_actor:
        if r.num_gpus_per_actor > 1:
            out.append(("ray.num_gpus_per_actor", f"placement colocated shares one GPU between rollout worker i and "
                                                  f"learner rank i: use 1 (got {r.num_gpus_per_actor:g}), or "
                                                  f"placement split"))
        if cfg.rollout.num_workers != cfg.learner.num_workers:
            out.append(("rollout.num_workers", f"placement colocated on GPUs pairs rollout worker i with learner rank "
                                               f"i: rollout.num_workers ({cfg.rollout.num_workers}) must equal "
                                               f"learner.num_workers ({cfg.learner.num_workers})"))
        if cfg.rollout.backend == "vllm" and cfg.rollout.vllm.tensor_parallel_size > 1:
            out.append(("rollout.vllm.tensor_parallel_size", "placement colocated gives each vLLM engine one GPU, "
                                                              "shared with a learner rank: use 1, or placement split"))
        if cfg.trainer.max_staleness:
            out.append(("trainer.max_staleness", f"{cfg.trainer.max_staleness} overlaps rollouts with the learner "
                                                 f"step, but placement colocated on GPUs (ray.num_gpus_per_actor > 0) "
                                                 f"puts the engines to sleep during it: use 0, or ray.placement: "
                                                 f"split (docs/design.md section 5)"))
    if r.weight_sync == "cuda_ipc" and (r.placement != "colocated" or not r.num_gpus_per_actor):
        out.append(("ray.weight_sync", "cuda_ipc hands GPU memory to an engine on the same GPU: it needs "
                                       "ray.placement: colocated and ray.num_gpus_per_actor: 1"))
    return out


def check_files_exist(cfg: RunConfig, source: str | None = None) -> list[tuple[str, str]]:
    """Paths of the config that must exist. Relative paths are taken from the current directory
    (as ``output_dir`` is, and as every shipped config and README command assumes: run from the
    repository root); docs/runs.md says so."""
    out: list[tuple[str, str]] = []
    m = cfg.model.path
    if not cfg.model.is_tiny and looks_local(m):
        mp = Path(m).expanduser()
        if not mp.exists():
            out.append(("model.path", f"local model directory not found: {mp} (relative paths are taken from the "
                                      f"current directory: {mp.absolute()})"))
        elif mp.is_dir() and not (mp / "config.json").exists():
            out.append(("model.path", f"{mp} has no config.json (not a Hugging Face model directory)"))
        elif mp.is_dir():
            out += _positions_problems(cfg, mp / "config.json")
    elif not cfg.model.is_tiny and source is not None and (near := _beside_config(m, source)) is not None:
        # "models/countdown-toy" has the shape of a hub id: from another directory it would go to the hub
        out.append(("model.path", f"{m} is not a directory here (relative paths are taken from the current "
                                  f"directory, {Path.cwd()}), so it would be fetched as a hub id; but {near} "
                                  f"exists: run from {near.parents[len(Path(m).parts) - 1]} or give an absolute path"))
    for key, src in (("data.source", cfg.data.source), ("eval.source", cfg.eval.source)):
        if src and src not in (COUNTDOWN_GENERATED, COUNTDOWN_TOY) and looks_local(src) and not Path(src).expanduser().exists():
            out.append((key, f"file not found: {src} (absolute: {Path(src).expanduser().absolute()})"))
    resume = cfg.trainer.resume
    if resume not in ("auto", "never") and not Path(resume).expanduser().is_dir():
        out.append(("trainer.resume", f"must be auto, never or a checkpoint directory; {resume} is not a directory"))
    od = cfg.output_path
    if od.exists() and not od.is_dir():
        out.append(("output_dir", f"{od} exists and is not a directory"))
    elif not od.exists() and od.parent.exists() and not od.parent.is_dir():
        out.append(("output_dir", f"{od.parent} is not a directory"))
    return out


def _positions_problems(cfg: RunConfig, config_json: Path) -> list[tuple[str, str]]:
    """``max_new_tokens`` (rollout, eval) that cannot fit the model's positions even after a
    one-token prompt: refused here, not by the rollout workers after Ray started."""
    from rlmem.models.hf_config import max_positions

    limit = max_positions(str(config_json.parent))
    if limit is None:
        return []
    return [(f"{sec}.max_new_tokens", f"{n} new tokens after a prompt exceed the model's max_position_embeddings "
                                      f"({limit}, {config_json})")
            for sec, n in (("rollout", cfg.rollout.max_new_tokens), ("eval", cfg.eval.max_new_tokens))
            if n is not None and n + 1 > limit]   # eval's None: the rollout section's, checked once


def _beside_config(path: str, source: str) -> Path | None:
    """``path`` (relative, not found from here) as it exists below the config file's folder or one of
    its parents (the repository root, for ``configs/*.yaml``), or None."""
    if Path(path).is_absolute():
        return None
    for folder in Path(source).resolve().parents:
        if (folder / path).is_dir():
            return folder / path
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_local(path: str) -> bool:
    """Local paths must exist; ``org/name`` that is not on disk is a hub id, resolved at load time."""
    if path.startswith(("/", "./", "../", "~")) or path.endswith((".jsonl", ".json", ".parquet", ".csv")):
        return True
    if Path(path).exists():
        return True
    return not _HUB_ID.match(path)


def eviction_problem(err: ValueError, key: str | None = None) -> tuple[str, str]:
    """Map EvictionConfig's message (``eviction.window: why`` / ``eviction.delta (16) must ...``) to a key.

    ``key`` overrides the key (an ε from a list such as ``eval.eps.2``); the text is kept verbatim.
    """
    msg = str(err)
    m = re.match(r"eviction\.(\w+)(: )?(.*)", msg, re.S)
    if not m:
        return (key or "eviction", msg)
    return (key or f"eviction.{m.group(1)}", m.group(3) if m.group(2) else msg)



"""The run configuration: one typed schema for a whole NGC training run, checked before Ray starts.

A run is one YAML file plus dotted command-line overrides (``algorithm.prompts_per_step=8``).
:func:`load_config` parses both, validates every field (``extra="forbid"`` everywhere, so a typo is
an error, with a did-you-mean), then runs the cross-field checks (batch sizes that divide, the
eviction rules of :class:`~rlmem.eviction.policy.EvictionConfig`, files that must exist) and raises
one :class:`ConfigError` that lists *every* problem with its dotted key. Nothing heavy is imported
here: a bad config fails in well under a second, long before Ray, vLLM or DeepSpeed start.

Batch semantics (the thing users of other frameworks find most confusing) are spelled out once in
:meth:`RunConfig.batch_sizes`, in prompts and in samples; ``rlmem config show`` prints them.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlmem.eviction.policy import EvictionConfig

TINY_MODEL = "tiny:"          # model.path value: make a random tiny Qwen2 on the fly (see ModelConfig)
COUNTDOWN_GENERATED = "countdown-generated"  # data.source value: Countdown problems generated locally
COUNTDOWN_TOY = "countdown-toy"  # data.source value: the toy task's fixed problem set (rlmem/data/toy.py)


class ConfigError(ValueError):
    """Every problem of a config at once; each line names its dotted key (``algorithm.clip_eps: ...``)."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        lines = [f"{head} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  - {key}: {msg}" if key else f"  - {msg}" for key, msg in problems]
        super().__init__("\n".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------
# Sections


class TinyModelConfig(_Section):
    """Shape of the random model made when ``model.path`` is ``"tiny:"`` (rlmem.models.tiny)."""

    layers: int = Field(2, ge=1)
    hidden: int = Field(256, ge=64)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    seed: int = 0


class ModelConfig(_Section):
    """The policy. ``path`` is a local HF directory, a hub id (``org/name``) or ``"tiny:"``.

    ``"tiny:"`` writes a random tiny Qwen2 + character tokenizer to ``<output_dir>/tiny-model`` on
    first use (shape from ``model.tiny``); quote it in YAML (``path: "tiny:"``): unquoted it is a
    YAML syntax error, which load_config explains.
    """

    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    tiny: TinyModelConfig = TinyModelConfig()
    trust_remote_code: bool = False

    @field_validator("path", mode="before")
    @classmethod
    def _unquoted_tiny(cls, v: Any) -> Any:
        # ``path: tiny:`` unquoted in YAML parses as the mapping {"tiny": None}; accept what was meant.
        if isinstance(v, dict) and list(v) == ["tiny"] and v["tiny"] is None:
            return TINY_MODEL
        return v

    @property
    def is_tiny(self) -> bool:
        return self.path == TINY_MODEL


class CountdownGenConfig(_Section):
    """Countdown problems generated locally (``data.source: countdown-generated``)."""

    num_problems: int = Field(10000, ge=1)
    min_numbers: int = Field(3, ge=2)
    max_numbers: int = Field(4, ge=2)
    max_number: int = Field(99, ge=1)
    min_target: int = Field(10, ge=0)
    max_target: int = Field(100, ge=1)
    seed: int = 0


class ShapingReward(_Section):
    """An extra reward added to the verifier's, ``weight`` × ``name(completions, **kwargs)``.

    Accuracy is still measured by ``data.reward`` alone.
    """

    name: str
    weight: float = 0.1
    kwargs: dict[str, Any] = {}


class DataConfig(_Section):
    """Training prompts: ``source`` is ``countdown-generated``, ``countdown-toy``, a hub dataset id or a local
    JSONL/Parquet file."""

    source: str = COUNTDOWN_GENERATED
    split: str = "train"
    limit: int | None = Field(None, ge=1)          # use at most this many problems
    shuffle: bool = True
    template: Literal["auto", "plain"] = "auto"    # auto: the tokenizer's chat template if it has one
    reward: str = "countdown"                      # a name in rewards.registry or "module:function"
    reward_kwargs: dict[str, Any] = {}             # keyword arguments of the reward (e.g. format_score)
    shaping: list[ShapingReward] = []              # extra weighted rewards added to the verifier's
    countdown: CountdownGenConfig = CountdownGenConfig()


class VllmConfig(_Section):
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    cpu_kvcache_space_gb: int = Field(2, ge=1)     # VLLM_CPU_KVCACHE_SPACE for the CPU build


class RolloutConfig(_Section):
    """Generation. Log-probs are always under softmax(logits/temperature) without top-k/top-p."""

    backend: Literal["torch", "vllm"] = "torch"
    num_workers: int = Field(1, ge=1)
    temperature: float = Field(0.9, gt=0)
    top_k: int | None = Field(None, ge=1)          # null: no top-k truncation
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    stop: list[str] = []
    vllm: VllmConfig = VllmConfig()


class CurriculumConfig(_Section):
    """Staircase over retention rates ρ_0 ≥ … ≥ ρ_K (ε = 1 − ρ), blending into the next level."""

    enabled: bool = False
    retention_rates: list[float] = [1.0, 0.75, 0.5]
    steps_per_stage: int = Field(50, ge=1)
    blend_fraction: float = Field(0.6, ge=0, le=1)


class InteroceptionConfig(_Section):
    """One ε per group, drawn from ``eps_choices``; its tag is appended to the group's prompts.

    With the curriculum also enabled, a group draws from the choices not above the curriculum's
    current ε (the curriculum's ε itself when none is): the curriculum caps the rate."""

    enabled: bool = False
    eps_choices: list[float] = [0.25, 0.5, 0.75]


class EvictionSection(_Section):
    """NGC hyper-parameters (DESIGN.md section 1); the rules live in EvictionConfig and are reused."""

    delta: int = 256
    eps: float = 0.5
    block_size: int = 32
    window: int = 5
    protect_recent: int = 1
    score_transform: Literal["log", "linear"] = "log"
    tau: float = 1.0
    curriculum: CurriculumConfig = CurriculumConfig()
    interoception: InteroceptionConfig = InteroceptionConfig()


class AlgorithmConfig(_Section):
    """Dr. GRPO. One step = ``prompts_per_step`` prompts × ``rollouts_per_prompt`` rollouts."""

    prompts_per_step: int = Field(32, ge=1)
    rollouts_per_prompt: int = Field(16, ge=1)
    aggregation: Literal["constant", "token_mean", "seq_mean"] = "constant"
    loss_constant: int | None = Field(None, ge=1)  # "constant" normaliser; null: rollout.max_new_tokens
    scale_by_std: bool = False
    mini_batches: int = Field(1, ge=1)             # optimizer steps per rollout batch (per epoch)
    ppo_epochs: int = Field(1, ge=1)
    clip_eps: float | None = Field(None, gt=0)     # null: no clipping (on-policy, one update)
    clip_eps_high: float | None = Field(None, gt=0)
    mem_coef: float = Field(1.0, ge=0)
    kl_coef: float = Field(0.0, ge=0)
    min_length_rule: bool = False


class OptimizerConfig(_Section):
    lr: float = Field(5e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-15, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1)
    zero_stage: Literal[0, 2, 3] = 0
    micro_batch_size: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    offload_optimizer: bool = False
    replay_kernel: Literal["sdpa", "flex"] = "sdpa"  # flex: CUDA only (no CPU backward)
    replay_mask: Literal["evicted", "causal"] = "evicted"  # causal: plain causal mask, the paper's ablation


class RayConfig(_Section):
    address: str | None = None                     # null: start a local Ray; "auto": join the cluster
    placement: Literal["colocated", "separate"] = "separate"
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    weight_sync_timeout_s: float = Field(300, gt=0)
    weight_sync_bucket_mb: int = Field(256, ge=1)
    # Custom Ray resources per actor (e.g. {rollout_node: 0.01}): pin a role to the nodes that
    # advertise them (`ray start --resources`). Defaults of run_training's *_resources arguments.
    rollout_resources: dict[str, float] | None = None
    learner_resources: dict[str, float] | None = None


class TrainerConfig(_Section):
    total_steps: int = Field(ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0)               # 0: only at the end (when eval.source is set)
    save_every: int = Field(0, ge=0)               # 0: only at the end
    keep_last: int | None = Field(3, ge=1)         # null: keep every checkpoint
    resume: str = "auto"                           # auto | never | path to a checkpoint dir


class WandbConfig(_Section):
    project: str = "rlmem"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = []


class LoggingConfig(_Section):
    wandb: WandbConfig = WandbConfig()
    sample_table_size: int = Field(8, ge=0)
    mask_image_every: int = Field(10, ge=0)        # 0: never
    progress_bar: bool = True


class EvalConfig(_Section):
    source: str | None = None                      # null: no evaluation
    split: str = "test"
    limit: int | None = Field(None, ge=1)
    num_samples: int = Field(1, ge=1)              # n per problem for the unbiased pass@k
    k: list[int] = [1]
    eps: list[float] = [0.0, 0.5]                  # accuracy vs compression sweep
    temperature: float = Field(0.6, gt=0)
    max_new_tokens: int | None = Field(None, ge=1)  # null: rollout.max_new_tokens


# ----------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class BatchSizes:
    """Derived batch sizes of one training step, in prompts and in samples (= rollouts)."""

    prompts_per_step: int
    rollouts_per_prompt: int
    samples_per_step: int
    rollout_workers: int
    samples_per_rollout_worker: int
    prompts_per_rollout_worker: float   # groups may straddle workers when this is not whole
    mini_batches: int
    ppo_epochs: int
    optimizer_steps_per_step: int
    samples_per_optimizer_step: int     # DeepSpeed train_batch_size
    learner_workers: int
    samples_per_learner: int            # per optimizer step
    micro_batch_size: int
    micro_batches_per_learner: int      # per training step (all mini-batches, one epoch)
    gradient_accumulation_steps: int    # micro-batches per learner per optimizer step

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


class RunConfig(_Section):
    """A whole run. Build it with :func:`load_config` (which also runs the cross-field checks)."""

    output_dir: str
    seed: int = 0
    model: ModelConfig
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    eviction: EvictionSection = EvictionSection()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    learner: LearnerConfig = LearnerConfig()
    ray: RayConfig = RayConfig()
    trainer: TrainerConfig
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    # -- derived ---------------------------------------------------------------------------------

    def eviction_config(self, eps: float | None = None) -> EvictionConfig:
        """The policy config at rate ``eps`` (default ``eviction.eps``); raises ValueError if invalid."""
        e = self.eviction
        return EvictionConfig(delta=e.delta, eps=e.eps if eps is None else float(eps), block_size=e.block_size,
                              window=e.window, protect_recent=e.protect_recent,
                              score_transform=e.score_transform, tau=e.tau)

    def batch_sizes(self) -> BatchSizes:
        """Every derived batch size; integer divisions are exact once :func:`check_config` passed."""
        a, r, lr = self.algorithm, self.rollout, self.learner
        samples = a.prompts_per_step * a.rollouts_per_prompt
        per_opt = samples // a.mini_batches
        per_learner = per_opt // lr.num_workers
        accum = per_learner // lr.micro_batch_size
        return BatchSizes(
            prompts_per_step=a.prompts_per_step, rollouts_per_prompt=a.rollouts_per_prompt,
            samples_per_step=samples, rollout_workers=r.num_workers,
            samples_per_rollout_worker=samples // r.num_workers,
            prompts_per_rollout_worker=a.prompts_per_step / r.num_workers,
            mini_batches=a.mini_batches, ppo_epochs=a.ppo_epochs,
            optimizer_steps_per_step=a.mini_batches * a.ppo_epochs,
            samples_per_optimizer_step=per_opt, learner_workers=lr.num_workers,
            samples_per_learner=per_learner, micro_batch_size=lr.micro_batch_size,
            micro_batches_per_learner=accum * a.mini_batches, gradient_accumulation_steps=accum)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    @property
    def tiny_model_dir(self) -> Path:
        return self.output_path / "tiny-model"

    def resolve_model_path(self) -> str:
        """The path to load the policy from; makes the tiny model on first use (idempotent)."""
        if not self.model.is_tiny:
            return str(Path(self.model.path).expanduser()) if _looks_local(self.model.path) else self.model.path
        out = self.tiny_model_dir
        if not (out / "config.json").exists():
            from rlmem.models.tiny import make_tiny_model

            t = self.model.tiny
            make_tiny_model(out, layers=t.layers, hidden=t.hidden, heads=t.heads, kv_heads=t.kv_heads, seed=t.seed)
        return str(out)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                check_files: bool = True) -> RunConfig:
    """Read ``path`` (YAML), apply dotted ``overrides`` (``key.sub=value``, value parsed as YAML),
    validate, and run :func:`check_config`. Raises one :class:`ConfigError` listing every problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([("", f"config file not found: {p}" if not p.exists() else f"not a file: {p}")], str(p))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        hint = ""
        if re.search(r":\s*tiny:\s*(#|$)", p.read_text(), re.M):
            hint = ' (model.path: write "tiny:" in quotes; unquoted it is YAML syntax)'
        raise ConfigError([("", f"YAML syntax error{hint}: {e}")], str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", f"the top level must be a mapping of sections, got {type(data).__name__}")], str(p))
    return config_from_dict(data, overrides, check_files=check_files, source=str(p))


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                     check_files: bool = True, source: str | None = None) -> RunConfig:
    """Like :func:`load_config` for an already-parsed mapping (tests, notebooks, the driver)."""
    problems: list[tuple[str, str]] = []
    data = _deep_copy(data)
    for ov in overrides:
        problems += apply_override(data, ov)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        problems += _pydantic_problems(e)
        raise ConfigError(problems, source) from None
    problems += check_config(cfg, check_files=check_files)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def parse_override_value(raw: str) -> Any:
    """A YAML scalar, or a flow list/mapping when it starts with ``[``/``{``; otherwise the raw text.

    So ``model.path=tiny:`` stays the string ``"tiny:"`` instead of becoming the mapping ``{tiny: null}``.
    """
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(v, (dict, list)) and not raw.lstrip().startswith(("[", "{")):
        return raw
    return v


def apply_override(data: dict[str, Any], override: str) -> list[tuple[str, str]]:
    """Set ``data[a][b][c] = value`` for ``a.b.c=value`` in place; return problems (never raises)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        return [(key or override, f"override {override!r} must look like dotted.key=value")]
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            return [(key, f"cannot set a sub-key: {where} is a {type(nxt).__name__}, not a section")]
        node = nxt
    node[parts[-1]] = parse_override_value(raw)
    return []


# ----------------------------------------------------------------------------------------------
# Cross-field checks


def check_config(cfg: RunConfig, *, check_files: bool = True) -> list[tuple[str, str]]:
    """Problems that involve several fields or the file system, as ``(dotted key, message)``."""
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
    if (a.mini_batches > 1 or a.ppo_epochs > 1) and a.clip_eps is None:
        out.append(("algorithm.clip_eps", "must be set (e.g. 0.2) when a batch is reused "
                                          "(algorithm.mini_batches > 1 or algorithm.ppo_epochs > 1)"))
    if a.clip_eps_high is not None:
        if a.clip_eps is None:
            out.append(("algorithm.clip_eps_high", "needs algorithm.clip_eps"))
        elif a.clip_eps_high < a.clip_eps:
            out.append(("algorithm.clip_eps_high", f"({a.clip_eps_high}) must be >= algorithm.clip_eps ({a.clip_eps})"))
    if a.rollouts_per_prompt < 2:
        out.append(("algorithm.rollouts_per_prompt", "must be >= 2: group advantages need at least two rollouts"))

    # Eviction: the rules live in EvictionConfig; build one per ε the run can use.
    base_ok = True
    try:
        cfg.eviction_config()
    except ValueError as e:
        out.append(_eviction_problem(e))
        base_ok = False   # then every other ε would repeat the same complaint
    cur, intro = ev.curriculum, ev.interoception
    if cur.enabled:
        rates = cur.retention_rates
        if not rates:
            out.append(("eviction.curriculum.retention_rates", "must not be empty"))
        for i, rho in enumerate(rates):
            if not 0.0 <= rho <= 1.0:
                out.append((f"eviction.curriculum.retention_rates.{i}", f"must be in [0, 1) (got {rho})"))
            elif rho == 0.0:
                out.append((f"eviction.curriculum.retention_rates.{i}", "retention 0 would evict everything"))
        if any(x < y for x, y in zip(rates, rates[1:])):
            out.append(("eviction.curriculum.retention_rates", f"must be non-increasing (got {rates})"))
    if intro.enabled:
        if not intro.eps_choices:
            out.append(("eviction.interoception.eps_choices", "must not be empty"))
        for i, e in enumerate(intro.eps_choices if base_ok else []):
            try:
                cfg.eviction_config(e)
            except ValueError as err:
                out.append(_eviction_problem(err, f"eviction.interoception.eps_choices.{i}"))
    for i, e in enumerate(cfg.eval.eps if base_ok else []):
        try:
            cfg.eviction_config(e)
        except ValueError as err:
            out.append(_eviction_problem(err, f"eval.eps.{i}"))

    for key in ("rollout_resources", "learner_resources"):
        for name, amount in (getattr(cfg.ray, key) or {}).items():
            if name in ("CPU", "GPU", "memory"):
                out.append((f"ray.{key}.{name}", f"{name} is not a custom resource; use ray.num_cpus_per_actor / "
                                                 f"ray.num_gpus_per_actor"))
            elif amount <= 0:
                out.append((f"ray.{key}.{name}", f"must be > 0 (got {amount})"))
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
    if cfg.rollout.backend == "torch" and r.vllm.tensor_parallel_size > 1:
        out.append(("rollout.vllm.tensor_parallel_size", "only applies to rollout.backend: vllm"))

    if check_files:
        out += _check_files(cfg)
    return out


def _check_files(cfg: RunConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    m = cfg.model.path
    if not cfg.model.is_tiny and _looks_local(m):
        mp = Path(m).expanduser()
        if not mp.exists():
            out.append(("model.path", f"local model directory not found: {mp} (absolute: {mp.absolute()})"))
        elif mp.is_dir() and not (mp / "config.json").exists():
            out.append(("model.path", f"{mp} has no config.json (not a Hugging Face model directory)"))
    for key, src in (("data.source", cfg.data.source), ("eval.source", cfg.eval.source)):
        if src and src not in (COUNTDOWN_GENERATED, COUNTDOWN_TOY) and _looks_local(src) and not Path(src).expanduser().exists():
            out.append((key, f"file not found: {src} (absolute: {Path(src).expanduser().absolute()})"))
    resume = cfg.trainer.resume
    if resume not in ("auto", "never") and not (Path(resume).expanduser() / "trainer_state.json").is_file():
        out.append(("trainer.resume", f"must be auto, never or a complete checkpoint directory; "
                                      f"{resume} has no trainer_state.json"))
    return out


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(path: str) -> bool:
    """Local paths must exist; ``org/name`` that is not on disk is a hub id, resolved at load time."""
    if path.startswith(("/", "./", "../", "~")) or path.endswith((".jsonl", ".json", ".parquet", ".csv")):
        return True
    if Path(path).exists():
        return True
    return not _HUB_ID.match(path)


def _eviction_problem(err: ValueError, key: str | None = None) -> tuple[str, str]:
    """Map EvictionConfig's message (``eviction.window: why`` / ``eviction.delta (16) must ...``) to a key.

    ``key`` overrides the key (an ε from a list such as ``eval.eps.2``); the text is kept verbatim.
    """
    msg = str(err)
    m = re.match(r"eviction\.(\w+)(: )?(.*)", msg, re.S)
    if not m:
        return (key or "eviction", msg)
    return (key or f"eviction.{m.group(1)}", m.group(3) if m.group(2) else msg)


def _pydantic_problems(e: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in e.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            hint = _did_you_mean(err["loc"])
            if hint:
                msg += f"; did you mean {hint!r}?"
            else:
                known = _known_fields(err["loc"][:-1])
                if known:
                    msg += f"; known keys here: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        out.append((key, msg))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _unwrap_model(field.annotation)
        if model is None:
            return None
    return model


def _unwrap_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if get_origin(tp) in (Union, types.UnionType, list):
        for arg in get_args(tp):
            m = _unwrap_model(arg)
            if m is not None:
                return m
    return None


def _known_fields(parent: tuple) -> list[str]:
    model = _model_at(parent)
    return list(model.model_fields) if model is not None else []


def _did_you_mean(loc: tuple) -> str | None:
    name = str(loc[-1])
    known = _known_fields(tuple(loc[:-1]))
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if match:
        prefix = ".".join(str(x) for x in loc[:-1])
        return f"{prefix}.{match[0]}" if prefix else match[0]
    # A key put in the wrong section: look for it one level down in every section.
    hits = []
    if len(loc) == 1:
        for sec, field in RunConfig.model_fields.items():
            sub = _unwrap_model(field.annotation)
            if sub is not None and name in sub.model_fields:
                hits.append(f"{sec}.{name}")
    return hits[0] if len(hits) == 1 else None


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x

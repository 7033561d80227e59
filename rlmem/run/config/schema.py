"""The run-config schema: one typed section per part of a run, pure data (nothing here writes files).

Sections whose settings are defined elsewhere are *derived* from that one definition, field names,
types and defaults included: ``eviction`` from :class:`rlmem.eviction.policy.EvictionConfig`,
the sampling fields of ``rollout`` and ``eval`` from :class:`rlmem.engine.sampling.SamplingParams`,
``optimizer``, ``learner`` and the loss fields of ``algorithm`` from
:class:`rlmem.learner.config.LearnerConfig`. Their rules are applied by the checks, which build the
one definition from the section (so the messages are the definition's, with the section's key). Loading (YAML, overrides) lives in
:mod:`rlmem.run.config.loading`, the cross-field checks in :mod:`rlmem.run.config.checks`.

Batch semantics (the thing users of other frameworks find most confusing) are spelled out once in
:meth:`RunConfig.batch_sizes`, in prompts and in samples; ``rlmem config show`` prints them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError

from rlmem.dtypes import MODEL_DTYPES
from rlmem.engine.sampling import SAMPLING_FIELDS, SamplingParams
from rlmem.evaluation.pipeline import eval_sampling_default
from rlmem.eviction.policy import EVICTION_FIELDS, EvictionConfig
from rlmem.learner.config import ALGORITHM_FIELDS, LEARNER_FIELDS, OPTIMIZER_FIELDS, LearnerConfig

TINY_MODEL = "tiny:"          # model.path value: make a random tiny Qwen2 on the fly (see ModelConfig)
COUNTDOWN_GENERATED = "countdown-generated"  # data.source value: Countdown problems generated locally
COUNTDOWN_TOY = "countdown-toy"  # data.source value: the toy task's fixed problem set (rlmem/data/toy.py)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, numbers are finite, booleans are not numbers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info) -> Any:
        # YAML `true` is not a step count: pydantic's lax mode would take it as 1.
        if isinstance(v, bool) and info.field_name and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return v


def _is_number(tp: Any) -> bool:
    if tp in (int, float):
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in typing.get_args(tp))
    return any(_is_number(a) for a in typing.get_args(tp) if a is not type(None)) if typing.get_args(tp) else False


def derived_section(name: str, source: type, fields: tuple[str, ...], doc: str, *,
                    constraints: dict[str, dict[str, Any]] | None = None,
                    defaults: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    base: type[Section] | None = None, extra_first: bool = False) -> type[Section]:
    """A section whose ``fields`` are those of the dataclass ``source``: same names, types and defaults.

    ``constraints`` adds pydantic bounds (``{"lr": {"gt": 0}}``); ``defaults`` overrides a default on
    purpose (document why at the call); ``extra`` adds section-only fields as ``(type, FieldInfo)``
    (after the derived ones, or before them with ``extra_first``); ``base``: a Section subclass
    carrying the source's validators.
    """
    hints = typing.get_type_hints(source)
    by_name = {f.name: f for f in dataclasses.fields(source)}
    spec: dict[str, Any] = {}
    for f in fields:
        own = by_name[f].default if by_name[f].default is not dataclasses.MISSING else by_name[f].default_factory()
        d = (defaults or {}).get(f, own)
        help_ = by_name[f].metadata.get("help") if by_name[f].metadata else None
        spec[f] = (hints[f], Field(d, description=help_, **(constraints or {}).get(f, {})))
    spec = {**(extra or {}), **spec} if extra_first else {**spec, **(extra or {})}
    model = create_model(name, __base__=base or Section, __doc__=doc, **spec)
    model.__module__ = __name__
    return model


class TinyModelConfig(Section):
    """Shape of the random model made when ``model.path`` is ``"tiny:"`` (rlmem.models.tiny)."""

    layers: int = Field(2, ge=1)
    hidden: int = Field(256, ge=64)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    seed: int = 0


class ModelConfig(Section):
    """The policy. ``path`` is a local HF directory, a hub id (``org/name``) or ``"tiny:"``.

    ``"tiny:"`` writes a random tiny Qwen2 + character tokenizer to ``<output_dir>/tiny-model`` on
    first use (shape from ``model.tiny``); quote it in YAML (``path: "tiny:"``): unquoted it is a
    YAML syntax error, which load_config explains.
    """

    path: str
    dtype: Literal[MODEL_DTYPES] = "bfloat16"   # rlmem.dtypes, the one table
    tiny: TinyModelConfig = TinyModelConfig()

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


class CountdownGenConfig(Section):
    """Countdown problems generated locally (``data.source: countdown-generated``)."""

    num_problems: int = Field(10000, ge=1)
    min_numbers: int = Field(3, ge=2)
    max_numbers: int = Field(4, ge=2)
    max_number: int = Field(99, ge=1)
    min_target: int = Field(10, ge=0)
    max_target: int = Field(100, ge=1)
    seed: int = 0


class ShapingReward(Section):
    """An extra reward added to the verifier's, ``weight`` × ``name(completions, **kwargs)``.

    Accuracy is still measured by ``data.reward`` alone.
    """

    name: str
    weight: float = 0.1
    kwargs: dict[str, Any] = {}


class DataConfig(Section):
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


class VllmConfig(Section):
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    cpu_kvcache_space_gb: int = Field(2, ge=1)     # VLLM_CPU_KVCACHE_SPACE for the CPU build


class SamplingSection(Section):
    """Base of the sections holding SamplingParams fields: each value is checked by SamplingParams'
    own rule (the one definition; the message is its, with the section's key). ``top_k: null``
    (older configs) means 0, off. ``greedy_ok``: temperature 0 means greedy decoding (evaluation)."""

    greedy_ok: ClassVar[bool] = False

    @field_validator("top_k", mode="before", check_fields=False)
    @classmethod
    def _null_top_k(cls, v: Any) -> Any:
        return 0 if v is None else v

    @field_validator(*SAMPLING_FIELDS, mode="after", check_fields=False)
    @classmethod
    def _sampling_rule(cls, v: Any, info) -> Any:
        if v is None:   # eval's max_new_tokens / stop: the rollout section's
            return v
        try:
            SamplingParams.from_fields({info.field_name: v}, allow_greedy=cls.greedy_ok)
        except ValueError as e:
            why = re.sub(r"^sampling\.\w+: ", "", str(e))
            raise PydanticCustomError("sampling", re.sub(r" \(got [^()]*\)$", "", why)) from None
        return v


class EvalSamplingSection(SamplingSection):
    greedy_ok: ClassVar[bool] = True


def sampling_values(section: BaseModel) -> dict[str, Any]:
    """The SamplingParams fields of a ``rollout`` or ``eval`` section (None: not set there)."""
    return {k: getattr(section, k) for k in SAMPLING_FIELDS}


# Training's sampling defaults differ from SamplingParams' neutral ones (T 1, 256 tokens) on purpose:
# the paper's Countdown settings, temperature 0.9 and 1024 new tokens. (The paper also samples with
# top-k 50; the default leaves top-k off so that rollouts sample the distribution the learner
# replays, docs/design.md section 1; configs/countdown-r1-distill-1.5b.yaml sets it.)
ROLLOUT_SAMPLING_DEFAULTS = {"temperature": 0.9, "max_new_tokens": 1024}

RolloutConfig = derived_section(
    "RolloutConfig", SamplingParams, SAMPLING_FIELDS,
    "Generation: SamplingParams' fields (defaults: the paper's T 0.9 and 1024 new tokens), the engine "
    "and its workers. Log-probs are always under softmax(logits/temperature) without top-k/top-p.",
    defaults=ROLLOUT_SAMPLING_DEFAULTS, base=SamplingSection,
    extra={"backend": (str, Field("torch")),       # an engine name in rlmem.engine's registry
           "num_workers": (int, Field(1, ge=1)),
           "vllm": (VllmConfig, Field(default_factory=VllmConfig))})


class CurriculumConfig(Section):
    """Staircase over retention rates ρ_0 ≥ … ≥ ρ_K (ε = 1 − ρ), blending into the next level."""

    enabled: bool = False
    retention_rates: list[float] = [1.0, 0.75, 0.5]
    steps_per_stage: int = Field(50, ge=1)
    blend_fraction: float = Field(0.6, ge=0, le=1)


class InteroceptionConfig(Section):
    """One ε per group, drawn from ``eps_choices``; its tag is appended to the group's prompts.

    With the curriculum also enabled, a group draws from the choices not above the curriculum's
    current ε (the curriculum's ε itself when none is): the curriculum caps the rate."""

    enabled: bool = False
    eps_choices: list[float] = [0.25, 0.5, 0.75]


class EvictionStage(Section):
    """From training step ``from_step`` on (1-based, so a run resumed from ``step_000060`` enters a
    stage with ``from_step: 61``), ``eps`` and/or ``tau`` replace ``eviction.eps`` / ``eviction.tau``.
    A field a stage leaves unset keeps the value in force before it; later stages win."""

    from_step: int = Field(ge=1)
    eps: float | None = None
    tau: float | None = None


EVICTION_POLICY_FIELDS = EVICTION_FIELDS

EvictionSection = derived_section(
    "EvictionSection", EvictionConfig, EVICTION_POLICY_FIELDS,
    "NGC hyper-parameters: exactly EvictionConfig's fields and defaults (its rules are applied by the "
    "checks), plus how ε varies over groups and steps.",
    extra={"curriculum": (CurriculumConfig, Field(default_factory=CurriculumConfig)),
           "interoception": (InteroceptionConfig, Field(default_factory=InteroceptionConfig)),
           "stages": (list[EvictionStage], Field(default_factory=list))})


def policy_config(eviction: BaseModel, eps: float | None = None, tau: float | None = None) -> EvictionConfig:
    """The :class:`EvictionConfig` of an ``eviction`` section at rate ``eps`` and block-logit
    temperature ``tau`` (defaults: its own ``eps`` and ``tau``).

    Raises ValueError (naming the field) when the policy refuses the values."""
    values = {f: getattr(eviction, f) for f in EVICTION_POLICY_FIELDS}
    if eps is not None:
        values["eps"] = float(eps)
    if tau is not None:
        values["tau"] = float(tau)
    return EvictionConfig(**values)


class _AlgorithmBase(Section):
    @field_validator("tis", mode="before", check_fields=False)
    @classmethod
    def _tis_off(cls, v: Any) -> Any:
        # YAML reads `tis: off` as false; off, none and false all mean "no TIS" (null).
        return None if v is False or (isinstance(v, str) and v.lower() in ("off", "none", "null")) else v


AlgorithmConfig = derived_section(
    "AlgorithmConfig", LearnerConfig, ALGORITHM_FIELDS,
    "Dr. GRPO. One step = ``prompts_per_step`` prompts × ``rollouts_per_prompt`` rollouts. The loss "
    "fields (aggregation, mem_coef, kl_coef, clip_eps, clip_eps_high, mini_batches, ppo_epochs, tis, tis_cap) are "
    "LearnerConfig's.",
    constraints={"mem_coef": {"ge": 0}, "kl_coef": {"ge": 0}, "clip_eps": {"gt": 0}, "clip_eps_high": {"gt": 0},
                 "tis_cap": {"gt": 0},
                 "mini_batches": {"ge": 1}, "ppo_epochs": {"ge": 1}},
    extra={"prompts_per_step": (int, Field(32, ge=1)),
           "rollouts_per_prompt": (int, Field(16, ge=1)),
           # "constant" normaliser; null: rollout.max_new_tokens (becomes LearnerConfig.max_len)
           "loss_constant": (int | None, Field(None, ge=1)),
           "scale_by_std": (bool, Field(False)),
           "min_length_rule": (bool, Field(False))},
    base=_AlgorithmBase)

OptimizerConfig = derived_section(
    "OptimizerConfig", LearnerConfig, OPTIMIZER_FIELDS, "AdamW and its learning-rate schedule (LearnerConfig's fields).",
    constraints={"lr": {"gt": 0}, "eps": {"gt": 0}, "weight_decay": {"ge": 0}, "grad_clip": {"gt": 0},
                 "warmup_steps": {"ge": 0}, "min_lr_ratio": {"ge": 0, "le": 1}})

LearnerSection = derived_section(
    "LearnerSection", LearnerConfig, LEARNER_FIELDS,
    "The learner ranks (LearnerConfig's fields) and how many there are. dtype defaults to bfloat16 here "
    "on purpose (real runs), while LearnerConfig itself defaults to float32 (exact tests).",
    constraints={"micro_batch_size": {"ge": 1}},
    defaults={"dtype": "bfloat16"},
    extra={"num_workers": (int, Field(1, ge=1))})


PLACEMENT_ALIASES = {"separate": "split"}   # older configs' name of the split placement


class RayConfig(Section):
    """Where the actors run and how weights reach the engines (docs/gpu.md).

    ``placement``: ``colocated`` puts rollout worker i and learner rank i in one bundle (with GPUs:
    one GPU, shared; vLLM sleeps during the learner step); ``split`` gives each role its own bundles
    (its own GPUs). ``weight_sync``: ``auto`` picks the Ray object store without CUDA, CUDA IPC when
    colocated on GPUs, a broadcast over a dedicated process group when split on GPUs."""

    address: str | None = None                     # null: start a local Ray; "auto": join the cluster
    placement: Literal["colocated", "split"] = "split"
    weight_sync: Literal["auto", "object_store", "cuda_ipc", "broadcast"] = "auto"
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    # torch intra-op threads per actor; null: the node's cores over the larger worker count (over both
    # counts summed with trainer.max_staleness >= 1, when rollouts and the learner run at once). Set it
    # when several runs share one machine (two runs at 2 threads each on 2 cores slow both many-fold).
    torch_threads: int | None = Field(None, ge=1)
    weight_sync_timeout_s: float = Field(300, gt=0)
    weight_sync_bucket_mb: int = Field(256, ge=1)
    # Custom Ray resources per actor (e.g. {rollout_node: 0.01}): pin a role to the nodes that
    # advertise them (`ray start --resources`). Defaults of run_training's *_resources arguments.
    rollout_resources: dict[str, float] | None = None
    learner_resources: dict[str, float] | None = None

    @field_validator("placement", mode="before")
    @classmethod
    def _placement_alias(cls, v: Any) -> Any:
        return PLACEMENT_ALIASES.get(v, v) if isinstance(v, str) else v


class TrainerConfig(Section):
    total_steps: int = Field(ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0)               # 0: only at the end (when eval.source is set)
    save_every: int = Field(0, ge=0)               # 0: only at the end
    keep_last: int | None = Field(3, ge=1)         # null: keep every checkpoint
    # auto: the newest verified checkpoint if any, else a fresh start; never: a fresh start;
    # or the path of a checkpoint directory. A fresh start refuses a directory holding another run.
    resume: str = "auto"
    start_over: bool = False                       # move an earlier run's files aside (never deleted)
    allow_config_change: bool = False              # resume although the config's meaning changed
    # Bounded staleness (docs/design.md section 5): 0 = on-policy, each step's rollouts sampled by the
    # weights after the previous step; k >= 1 = step n's rollouts are sampled by the weights after
    # step max(0, n-1-k), so generation of steps n+1..n+k overlaps the learner's step n. Needs the
    # clipped surrogate (algorithm.clip_eps): the recorded log-probs are then π_old.
    max_staleness: int = Field(0, ge=0)


class WandbConfig(Section):
    project: str = "rlmem"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = []


class LoggingConfig(Section):
    wandb: WandbConfig = WandbConfig()
    sample_table_size: int = Field(8, ge=0)
    mask_image_every: int = Field(10, ge=0)        # 0: never
    # every Nth step's rollouts, all of them, as rollout records (docs/design.md section 2) in
    # records/step_NNNNNN.jsonl, for `rlmem inspect` and `--retention`; 0: never
    records_every: int = Field(0, ge=0)
    progress_bar: bool = True


EVAL_OWN_SAMPLING = ("temperature", "top_k", "top_p")   # the rest default to the rollout section's

EvalConfig = derived_section(
    "EvalConfig", SamplingParams, EVAL_OWN_SAMPLING,
    "In-training evaluation, the pipeline of rlmem/evaluation on the rollout workers (the rows of "
    "`rlmem eval`). Sampling: SamplingParams' fields with evaluation's defaults "
    "(rlmem.evaluation.pipeline.EVAL_SAMPLING_DEFAULTS: T 0.6, top-p 0.95; temperature 0 = greedy); "
    "max_new_tokens and stop, when null, are the rollout section's (evaluate at the trained length).",
    defaults={k: eval_sampling_default(k) for k in EVAL_OWN_SAMPLING}, base=EvalSamplingSection, extra_first=True,
    extra={"source": (str | None, Field(None)),                 # null: no evaluation
           "split": (str, Field("test")),
           "limit": (int | None, Field(None, ge=1)),
           "num_samples": (int, Field(1, ge=1)),                 # n per problem for the unbiased pass@k
           "k": (list[int], Field(default_factory=lambda: [1])),  # pass@k beside k = 1, 2, 4, … ≤ n
           "eps": (list[float], Field(default_factory=lambda: [0.0, 0.5])),   # accuracy vs compression sweep
           "batch_size": (int, Field(16, ge=1)),                 # sequences per job (rlmem eval --batch-size)
           "max_new_tokens": (int | None, Field(None, description="null: rollout.max_new_tokens")),
           "stop": (list[str] | None, Field(None, description="null: rollout.stop"))})


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


class RunConfig(Section):
    """A whole run. Build it with :func:`load_config` (which also runs the cross-field checks)."""

    output_dir: str
    seed: int = 0
    model: ModelConfig
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    eviction: EvictionSection = EvictionSection()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    learner: LearnerSection = LearnerSection()
    ray: RayConfig = RayConfig()
    trainer: TrainerConfig
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    # -- derived ---------------------------------------------------------------------------------

    def eviction_config(self, eps: float | None = None, tau: float | None = None) -> EvictionConfig:
        """The policy config at rate ``eps`` and temperature ``tau`` (defaults ``eviction.eps`` /
        ``eviction.tau``; a step's values come from :func:`rlmem.train.curriculum.stage_at`);
        raises ValueError if invalid."""
        return policy_config(self.eviction, eps, tau)

    def learner_config(self, model_path: str) -> LearnerConfig:
        """What each learner rank gets: the sections' LearnerConfig fields plus the derived ones."""
        a = self.algorithm
        return LearnerConfig(
            model_path=model_path, seed=self.seed, **self.optimizer.model_dump(),
            **self.learner.model_dump(include=set(LEARNER_FIELDS)), **a.model_dump(include=set(ALGORITHM_FIELDS)),
            total_steps=self.trainer.total_steps * a.mini_batches * a.ppo_epochs,
            max_len=a.loss_constant or self.rollout.max_new_tokens)

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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)



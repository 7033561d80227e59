"""The one dtype table: the names configs and flags accept, their torch dtypes, replay tolerances.

Every dtype choice in rlmem (the run config's ``model.dtype`` and ``learner.dtype``, the CLI's
``--dtype``, the engines' traits, the model loader, replay-check's default tolerance) reads this
table, so a name means the same everywhere. Torch-free at import: :class:`rlmem.learner.config.LearnerConfig`
and the config schema use it before torch is imported; :func:`torch_dtype` imports torch when asked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dtype:
    """One floating-point dtype: its canonical name (torch's), accepted aliases, replay tolerance."""

    name: str
    aliases: tuple[str, ...]
    # Bound on |rollout - replay| log-prob (tokens and evictions) that replay-check accepts by default
    # (docs/design.md section 4). None: the learner's replay does not run in this dtype.
    replay_tol: float | None


TABLE: tuple[Dtype, ...] = (
    Dtype("float32", ("fp32",), 1e-4),     # measured about 5e-6 tokens, 1e-6 evictions
    Dtype("float64", ("fp64",), 1e-9),     # measured about 1e-14
    Dtype("bfloat16", ("bf16",), 0.15),    # measured max about 0.05 nats: one-token decode vs full-sequence replay
    Dtype("float16", ("fp16",), None),     # rollouts only (vLLM); the learner has no fp16 loss scaling
)

DTYPES: dict[str, Dtype] = {d.name: d for d in TABLE}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)
_BY_NAME: dict[str, Dtype] = {**{a: d for d in TABLE for a in d.aliases}, **DTYPES}

# The dtypes the learner's replay runs in (its config's choices, and the CLI's --dtype, whose
# commands replay or load the model the learner would).
LEARNER_DTYPES: tuple[str, ...] = tuple(d.name for d in TABLE if d.replay_tol is not None)
# The run config's model.dtype (the rollout engines of a training run): float64 is for parity
# checks on one process, so a run's rollouts are fp32, bf16 or fp16 (vLLM has no fp64).
MODEL_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def canonical(name: str, *, choices: tuple[str, ...] = DTYPE_NAMES, what: str = "dtype") -> str:
    """The canonical name of ``name`` (an alias such as ``bf16`` included); a ValueError naming ``what``
    and the accepted names when it is unknown or not among ``choices``."""
    d = _BY_NAME.get(name) if isinstance(name, str) else None
    if d is None or d.name not in choices:
        raise ValueError(f"{what}: must be one of {list(choices)} (got {name!r})")
    return d.name


def torch_dtype(name):
    """The ``torch.dtype`` of a name or alias (a ``torch.dtype`` passes through)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, canonical(name))


def replay_tolerance(name: str) -> float:
    """Replay-check's default tolerance for a dtype (ValueError if the replay does not run in it)."""
    return DTYPES[canonical(name, choices=LEARNER_DTYPES)].replay_tol

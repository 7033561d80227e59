"""The rollout record (docs/design.md section 2): dataclasses, validation, JSONL, and ``evicted_at``.

A record carries everything needed to replay a rollout without the engine that made it. Field
names are fixed by docs/design.md section 2; extra fields (``peak_kv``, texts, group ids, ...) live in ``extra``
and are written at the top level of the JSON object.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from rlmem.eviction.policy import EVICTION_FIELDS, EvictionConfig, keep_count, kept_key_slots, num_blocks, round_times
from rlmem.jsonl import iter_json_lines
from rlmem.metrics import peak_kv_entries

NEVER = 2**62  # evicted_at value of a key that is never evicted
# Eviction fields a record may omit (older records): their EvictionConfig default applies.
OPTIONAL_EVICTION_FIELDS = frozenset({"scorer", "scorer_args"})


class RecordError(ValueError):
    """A malformed rollout record; the message names the field (and file/line when read from JSONL)."""


@dataclass
class LayerEviction:
    num_blocks: int
    kept: list[int]
    logprob: float


@dataclass
class EvictionRound:
    t: int
    layers: list[LayerEviction]


@dataclass
class EvictionTrace:
    config: EvictionConfig
    rounds: list[EvictionRound] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = self.config.to_dict()
        d["scorer_args"] = self.config.scorer_settings()   # every setting, defaults included: what made it
        d["rounds"] = [{"t": r.t, "layers": [{"num_blocks": l.num_blocks, "kept": list(l.kept), "logprob": l.logprob}
                                             for l in r.layers]} for r in self.rounds]
        return d


@dataclass
class RolloutRecord:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    temperature: float
    reward: float | None = None
    eviction: EvictionTrace | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _FIXED = ("prompt_ids", "completion_ids", "logprobs", "temperature", "reward", "eviction")

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def eviction_config(self) -> EvictionConfig | None:
        return self.eviction.config if self.eviction is not None and self.eviction.config.enabled else None

    @property
    def num_rounds(self) -> int:
        return len(self.eviction.rounds) if self.eviction is not None else 0

    def to_dict(self) -> dict:
        d = {"prompt_ids": list(self.prompt_ids), "completion_ids": list(self.completion_ids),
             "logprobs": list(self.logprobs), "temperature": self.temperature, "reward": self.reward,
             "eviction": self.eviction.to_dict() if self.eviction is not None else None}
        for k, v in self.extra.items():
            if k in d:
                raise RecordError(f"extra field {k!r} would overwrite a fixed record field")
            d[k] = v
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "record") -> "RolloutRecord":
        """Parse and validate; raise :class:`RecordError` naming ``where`` and the field."""
        if not isinstance(d, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(d).__name__}")
        for key in ("prompt_ids", "completion_ids", "logprobs", "temperature"):
            if key not in d:
                raise RecordError(f"{where}: missing field {key!r}")
        prompt_ids = _int_list(d["prompt_ids"], f"{where}: prompt_ids")
        completion_ids = _int_list(d["completion_ids"], f"{where}: completion_ids")
        logprobs = _float_list(d["logprobs"], f"{where}: logprobs")
        if not prompt_ids:
            raise RecordError(f"{where}: prompt_ids: must not be empty")
        if len(logprobs) != len(completion_ids):
            raise RecordError(f"{where}: logprobs: has {len(logprobs)} entries but completion_ids has "
                              f"{len(completion_ids)} (one log-prob per completion token)")
        if any(v > 1e-6 for v in logprobs):
            raise RecordError(f"{where}: logprobs: log-probabilities must be <= 0")
        temperature = _number(d["temperature"], f"{where}: temperature")
        if temperature <= 0:
            raise RecordError(f"{where}: temperature: must be > 0 (got {temperature})")
        reward = d.get("reward")
        if reward is not None:
            reward = _number(reward, f"{where}: reward")
        ev = d.get("eviction")
        trace = None
        if ev is not None:
            trace = _parse_trace(ev, f"{where}: eviction", len(prompt_ids), len(prompt_ids) + len(completion_ids))
        extra = {k: v for k, v in d.items() if k not in cls._FIXED}
        return cls(prompt_ids, completion_ids, logprobs, float(temperature), reward, trace, extra)

    def validate(self, where: str = "record") -> None:
        """Round-trip through :meth:`from_dict`, which checks every field."""
        RolloutRecord.from_dict(self.to_dict(), where)


def _int_list(v: Any, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise RecordError(f"{where}: expected a list of integers")
    bad = next((i for i, x in enumerate(v) if x < 0), None)
    if bad is not None:   # where names the field: token ids (prompt_ids, completion_ids) or block indices (kept)
        raise RecordError(f"{where}: must be >= 0 (got {v[bad]} at index {bad})")
    return list(v)


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RecordError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


def _float_list(v: Any, where: str) -> list[float]:
    if not isinstance(v, list):
        raise RecordError(f"{where}: expected a list of numbers")
    return [_number(x, f"{where}[{i}]") for i, x in enumerate(v)]


def _parse_trace(ev: Any, where: str, prompt_len: int, seq_len: int) -> EvictionTrace:
    if not isinstance(ev, dict):
        raise RecordError(f"{where}: expected an object or null")
    for k in EVICTION_FIELDS:
        if k not in ev and k not in OPTIONAL_EVICTION_FIELDS:
            raise RecordError(f"{where}: missing field {k!r}")
    try:
        cfg = EvictionConfig(**{k: ev[k] for k in EVICTION_FIELDS if k in ev})
    except (ValueError, TypeError) as e:
        raise RecordError(f"{where}: {e}") from None
    rounds_raw = ev.get("rounds", [])
    if not isinstance(rounds_raw, list):
        raise RecordError(f"{where}.rounds: expected a list")
    expected_t = round_times(prompt_len, seq_len, cfg)
    if len(rounds_raw) != len(expected_t):
        raise RecordError(f"{where}.rounds: has {len(rounds_raw)} rounds but the schedule of a {seq_len}-token "
                          f"sequence with a {prompt_len}-token prompt has {len(expected_t)} (times {expected_t})")
    rounds, n_layers = [], None
    for r, (rr, t_exp) in enumerate(zip(rounds_raw, expected_t)):
        w = f"{where}.rounds[{r}]"
        if not isinstance(rr, dict) or "t" not in rr or "layers" not in rr:
            raise RecordError(f"{w}: expected an object with 't' and 'layers'")
        if rr["t"] != t_exp:
            raise RecordError(f"{w}.t: expected round time {t_exp} from the schedule, got {rr['t']!r}")
        if not isinstance(rr["layers"], list) or not rr["layers"]:
            raise RecordError(f"{w}.layers: expected a non-empty list (one entry per layer)")
        if n_layers is None:
            n_layers = len(rr["layers"])
        elif len(rr["layers"]) != n_layers:
            raise RecordError(f"{w}.layers: has {len(rr['layers'])} layers, earlier rounds have {n_layers}")
        layers = []
        for l, ll in enumerate(rr["layers"]):
            wl = f"{w}.layers[{l}]"
            if not isinstance(ll, dict):
                raise RecordError(f"{wl}: expected an object")
            for k in ("num_blocks", "kept", "logprob"):
                if k not in ll:
                    raise RecordError(f"{wl}: missing field {k!r}")
            nb = ll["num_blocks"]
            if isinstance(nb, bool) or not isinstance(nb, int) or nb < 1:
                raise RecordError(f"{wl}.num_blocks: expected a positive integer, got {nb!r}")
            kept = _int_list(ll["kept"], f"{wl}.kept")
            eligible = max(0, nb - cfg.protect_recent)
            if len(set(kept)) != len(kept) or any(k >= eligible for k in kept):
                raise RecordError(f"{wl}.kept: must be distinct eligible block indices < {eligible}, got {kept}")
            want = keep_count(nb, cfg.eps, cfg.protect_recent) - min(cfg.protect_recent, nb)
            if len(kept) != want:
                raise RecordError(f"{wl}.kept: keeps {len(kept)} eligible blocks, the keep count for "
                                  f"N={nb}, eps={cfg.eps} is {want}")
            lp = _number(ll["logprob"], f"{wl}.logprob")
            layers.append(LayerEviction(nb, kept, lp))
        rounds.append(EvictionRound(int(rr["t"]), layers))
    return EvictionTrace(cfg, rounds)


def evicted_at(record: RolloutRecord, num_layers: int | None = None) -> torch.Tensor:
    """``evicted_at[l, k]``: the round time at which layer ``l`` evicted key ``k`` (``NEVER`` if not).

    Derived by replaying the block rule on the recorded decisions (docs/design.md section 1, Replay mask).
    Raises :class:`RecordError` if a recorded block count does not match the alive keys.
    """
    n = record.seq_len
    trace = record.eviction
    if num_layers is None:
        if trace is None or not trace.rounds:
            raise ValueError("num_layers is required for a record without eviction rounds")
        num_layers = len(trace.rounds[0].layers)
    out = torch.full((num_layers, n), NEVER, dtype=torch.long)
    if trace is None or not trace.rounds:
        return out
    cfg = trace.config
    if len(trace.rounds[0].layers) != num_layers:
        raise RecordError(f"eviction.rounds[0].layers: record has {len(trace.rounds[0].layers)} layers, "
                          f"the model has {num_layers}")
    for l in range(num_layers):
        alive: list[int] = []
        written = 0
        for r, rnd in enumerate(trace.rounds):
            alive.extend(range(written, rnd.t))
            written = rnd.t
            dec = rnd.layers[l]
            if num_blocks(len(alive), cfg.block_size) != dec.num_blocks:
                raise RecordError(f"eviction.rounds[{r}].layers[{l}].num_blocks: recorded {dec.num_blocks}, "
                                  f"but {len(alive)} keys are alive (blocks of {cfg.block_size})")
            keep = kept_key_slots(len(alive), dec.kept, cfg)
            keep_set = set(keep)
            for i, pos in enumerate(alive):
                if i not in keep_set:
                    out[l, pos] = rnd.t
            alive = [alive[i] for i in keep]
    return out


def peak_kv(record: RolloutRecord, num_layers: int | None = None) -> int:
    """The largest number of entries any layer's cache held during the rollout (docs/design.md section 1, Metric).

    Uses the engine's ``extra["peak_kv"]`` when present (the engines apply the same rule to the
    cache they ran); otherwise applies :func:`rlmem.metrics.peak_kv_entries` to the counts the
    rounds imply: per round, the keys ``< t`` alive just before it (``evicted_at >= t``) and just
    after it (``evicted_at > t``), the largest over the layers; positions ``0..n-2`` are written (the
    last sampled token is never fed).
    """
    reported = record.extra.get("peak_kv")
    if isinstance(reported, (int, float)) and not isinstance(reported, bool):
        return int(reported)
    written = record.seq_len - 1
    if record.num_rounds == 0:
        return peak_kv_entries(written, [])
    ea = evicted_at(record, num_layers)
    pos = torch.arange(record.seq_len)
    rounds = []
    for r in record.eviction.rounds:
        older = pos[None, :] < r.t
        rounds.append((r.t, int((older & (ea >= r.t)).sum(dim=1).max()), int((older & (ea > r.t)).sum(dim=1).max())))
    return peak_kv_entries(written, rounds)


def write_jsonl(path: str | os.PathLike, records: Iterable[RolloutRecord], append: bool = False) -> None:
    """Write records as JSON lines. Without ``append`` the file is replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        with path.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec.to_dict()) + "\n")
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec.to_dict()) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[RolloutRecord]:
    """Read and validate every record; errors name the file, line and field."""
    return [RolloutRecord.from_dict(d, where) for where, d in iter_json_lines(path, RecordError)]

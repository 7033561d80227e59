"""The run's timeline: when each actor ran which phase of which step (``timeline.jsonl``, the
timeline figure, ``time/overlap``).

One span per row: ``{"step", "actor", "phase", "start", "end", "run_start"}``. ``start`` and ``end``
are seconds since ``run_start`` (the unix time this leg of the run started: a resumed run is a new
leg), so a row reads on its own and legs line up on one axis. ``step`` is the step the work belongs
to: the rollouts of step ``n`` may run while the learner trains an earlier step (docs/design.md
section 5), and their span says so by lying under another step's learner span.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

PHASES = ("rollout", "reward", "learner", "sync", "eval", "log", "checkpoint")
TIMELINE_FILE = "timeline.jsonl"


def span(step: int, actor: str, phase: str, start: float, end: float, run_start: float) -> dict[str, Any]:
    """A timeline row from unix times ``start`` and ``end`` (made relative to ``run_start``)."""
    if phase not in PHASES:
        raise ValueError(f"timeline phase {phase!r}: expected one of {', '.join(PHASES)}")
    return {"step": int(step), "actor": actor, "phase": phase, "start": round(start - run_start, 4),
            "end": round(max(end, start) - run_start, 4), "run_start": run_start}


def covered(interval: tuple[float, float], others: Iterable[tuple[float, float]]) -> float:
    """Seconds of ``interval`` covered by the union of ``others`` (overlapping others count once)."""
    a, b = interval
    total, reach = 0.0, a
    for s, e in sorted((max(s, a), min(e, b)) for s, e in others):
        start = max(s, reach)
        if e > start:
            total += e - start
            reach = e
    return total


def overlap_fraction(interval: tuple[float, float], others: Sequence[tuple[float, float]]) -> float:
    """The fraction of ``interval`` during which at least one of ``others`` also ran (0 when empty)."""
    length = interval[1] - interval[0]
    return covered(interval, others) / length if length > 0 else 0.0


def absolute(row: dict[str, Any]) -> tuple[float, float]:
    """A row's span in unix seconds."""
    return row["run_start"] + row["start"], row["run_start"] + row["end"]

"""What a policy keeps: how often each prompt position survives a whole rollout, and what it is worth.

A single rollout's picture (``rlmem inspect --index``) shows one decision sequence; a claim like
"the trained policy keeps the target, the heuristic does not" needs the rate over many rollouts.
For every prompt position ``p`` (the prompt is where a task states what the reasoning needs) and
layer ``l``, the retention is the fraction of rollouts in which layer ``l`` never evicted key ``p``
(``evicted_at[l, p] == NEVER``, docs/design.md section 1, Replay mask). The reward split says
whether keeping it mattered: the mean reward of rollouts that kept ``p`` in every layer against
those that evicted it in at least one.

Positions are compared across rollouts by index, which is meaningful when prompts share a layout
(one task's template); positions past the shortest prompt are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlmem.eviction.record import NEVER, RolloutRecord, evicted_at


@dataclass(frozen=True)
class PositionRetention:
    position: int
    token_id: int                 # the token at this position in the first rollout (a label)
    kept: tuple[float, ...]       # per layer: fraction of rollouts that never evicted this key
    kept_all_layers: float        # fraction of rollouts in which every layer kept it
    reward_kept: float | None     # mean reward when every layer kept it (None: no such rollout)
    reward_evicted: float | None  # mean reward when some layer evicted it (None: no such rollout)


def with_rounds(records: list[RolloutRecord]) -> list[RolloutRecord]:
    """The records that had at least one eviction round (the ones retention is measured over)."""
    return [r for r in records if r.num_rounds > 0]


def prompt_retention(records: list[RolloutRecord]) -> list[PositionRetention]:
    """Retention of each prompt position over the ``records`` that had eviction rounds.

    Raises ``ValueError`` when no record had a round (a full cache keeps everything: nothing to say)
    or when records disagree on the number of layers (they come from different models).
    """
    rows = with_rounds(records)
    if not rows:
        raise ValueError("no record has eviction rounds (full-cache rollouts keep every key)")
    n_layers = len(rows[0].eviction.rounds[0].layers)
    if any(len(r.eviction.rounds[0].layers) != n_layers for r in rows):
        raise ValueError("records disagree on the number of layers: they come from different models")
    n_pos = min(len(r.prompt_ids) for r in rows)
    # survived[i][l][p]: rollout i's layer l never evicted prompt position p
    survived = [(evicted_at(r, n_layers)[:, :n_pos] == NEVER).tolist() for r in rows]
    rewards = [float(r.reward) if r.reward is not None else None for r in rows]
    out = []
    for p in range(n_pos):
        per_layer = tuple(sum(s[l][p] for s in survived) / len(rows) for l in range(n_layers))
        all_kept = [all(s[l][p] for l in range(n_layers)) for s in survived]
        kept_r = [w for w, k in zip(rewards, all_kept) if k and w is not None]
        evicted_r = [w for w, k in zip(rewards, all_kept) if not k and w is not None]
        out.append(PositionRetention(
            position=p, token_id=rows[0].prompt_ids[p], kept=per_layer,
            kept_all_layers=sum(all_kept) / len(rows),
            reward_kept=sum(kept_r) / len(kept_r) if kept_r else None,
            reward_evicted=sum(evicted_r) / len(evicted_r) if evicted_r else None))
    return out


def format_retention(rows: list[PositionRetention], labels: list[str] | None = None) -> str:
    """A plain-text table, one line per prompt position (``labels``: decoded tokens, optional)."""
    def pct(v: float | None) -> str:
        return "    -" if v is None else f"{100 * v:5.1f}"

    n_layers = len(rows[0].kept) if rows else 0
    head = (f"{'pos':>4} {'token':>14} " + " ".join(f"{'L' + str(l):>5}" for l in range(n_layers))
            + f" {'all':>5} | {'reward kept':>11} {'evicted':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        label = labels[r.position] if labels is not None else str(r.token_id)
        lines.append(f"{r.position:>4} {label[:14]:>14} " + " ".join(pct(k) for k in r.kept)
                     + f" {pct(r.kept_all_layers)} | {pct(r.reward_kept):>11} {pct(r.reward_evicted):>7}")
    return "\n".join(lines)

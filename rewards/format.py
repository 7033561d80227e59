"""Format-shaping reward: did the completion start a final answer?

R1-style recipes add a small format reward next to the verifier so that a policy that never
produces a gradable answer still sees a learning signal (TinyZero uses a 0.1 format score). This
one pays for an ``<answer>`` opening tag in the gradable region (after the last ``</think>``, or
the whole text without thinking markup), which even a random tiny model emits now and then: the
tiny CPU config uses it, weighted 0.1, so its short runs have non-zero advantages.
"""

from __future__ import annotations

from rewards.registry import register_reward
from rewards.text import completion_text, gradable_region


@register_reward("answer_tag")
def answer_tag_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the gradable region contains ``<answer>``, else 0.0 (never raises)."""
    out = []
    for c in completions:
        try:
            region = gradable_region(completion_text(c))
            out.append(1.0 if region is not None and "<answer>" in region else 0.0)
        except Exception:  # noqa: BLE001 - garbage in, zero out
            out.append(0.0)
    return out

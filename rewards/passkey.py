"""Pass-key verifier: exact match of the last number in the completion's answer region.

The gradable region is the one of every rlmem verifier (after the last ``</think>``; nothing if a
``<think>`` is never closed). The completion is correct iff the **last** run of digits in it is
exactly the key: "The pass key is 12345." passes; "12345 ... 67890" (the key, then another number)
and "1234" fail. Only the last number counts, so listing many candidates does not pay.
Model text is only scanned with a linear-time regular expression, never executed.
"""

from __future__ import annotations

import re

from rewards.registry import register_reward
from rewards.text import column, completion_text, gradable_region

_DIGITS = re.compile(r"\d+")


def last_number(text: str) -> str | None:
    """The last maximal run of ASCII digits in ``text`` (None if there is none)."""
    found = None
    for m in _DIGITS.finditer(text):
        found = m.group(0)
    return found


@register_reward("passkey")
def passkey_reward(completions: list, answer=None, **kwargs) -> list[float]:
    """1.0 when the last number of the gradable region equals ``answer`` (the key), else 0.0."""
    golds = column({"answer": answer}, ("answer",), len(completions))
    out = []
    for c, gold in zip(completions, golds):
        try:
            region = gradable_region(completion_text(c))
            got = last_number(region) if region is not None else None
            out.append(1.0 if got is not None and gold is not None and got == str(gold).strip() else 0.0)
        except Exception:  # noqa: BLE001 - garbage in, zero out
            out.append(0.0)
    return out

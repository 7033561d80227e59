"""Helpers shared by the verifiers: completion text, the gradable region, answer tags."""

from __future__ import annotations

from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def completion_text(completion: Any) -> str:
    """Text of one completion: a string, or TRL's conversational form (a list of messages).

    For a message list, the contents of the assistant messages are joined (all messages if none
    has role ``assistant``); a content may itself be a list of ``{"type": "text", "text": ...}``
    parts. Anything else gives ``""`` (never raises).
    """
    try:
        if completion is None:
            return ""
        if isinstance(completion, str):
            return completion
        if isinstance(completion, dict):
            completion = [completion]
        if isinstance(completion, (list, tuple)):
            msgs = [m for m in completion if isinstance(m, dict)]
            assistant = [m for m in msgs if m.get("role") == "assistant"] or msgs
            parts = []
            for m in assistant:
                c = m.get("content", "")
                if isinstance(c, str):
                    parts.append(c)
                elif isinstance(c, (list, tuple)):
                    parts.extend(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text", ""), str))
            return "".join(parts)
        return ""
    except Exception:  # noqa: BLE001
        return ""


def gradable_region(text: str) -> str | None:
    """The part of ``text`` that may hold the final answer.

    * the text after the last ``</think>`` if there is one;
    * ``None`` (nothing gradable) if a ``<think>`` was opened and never closed: the model never
      finished thinking, so an answer inside the thought does not count;
    * otherwise the whole text (no thinking markup at all).
    """
    if not isinstance(text, str):
        return None
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE):]
    if THINK_OPEN in text:
        return None
    return text


def last_answer_tag(region: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` in ``region`` (None if none)."""
    # Linear time: a regex scan (``<answer>(.*?)</answer>``) is quadratic on text with many
    # opening tags and no closing one, which a policy can produce.
    end = region.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = region.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return region[start + len(ANSWER_OPEN):end]


def column(kwargs: dict, names: tuple[str, ...], n: int) -> list:
    """The first of ``names`` present in ``kwargs`` as a list of length ``n`` (Nones if absent)."""
    for name in names:
        if name in kwargs and kwargs[name] is not None:
            v = kwargs[name]
            if isinstance(v, (list, tuple)):
                v = list(v)
            elif hasattr(v, "tolist"):
                v = v.tolist()
            else:
                v = [v] * n
            if len(v) != n:
                raise ValueError(f"reward column {name!r} has {len(v)} items for {n} completions")
            return v
    return [None] * n

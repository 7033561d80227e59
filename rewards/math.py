"""Math verifier: HF ``math-verify`` in a process pool with a hard wall-clock kill per item.

* The gradable region is the text after the last ``</think>`` (nothing if a ``<think>`` is never
  closed; the whole text without thinking markup). Only its last ``tail_chars`` characters are
  considered (the final answer is at the end; this bounds the work per item).
* **Which answer is graded** (:func:`final_answer`; a policy under RL must not be able to hedge):

  - if the region has a ``\\boxed{}``, the content of the last balanced one; but if the region
    boxes two *different* answers (compared after removing spaces and ``$``), or the last box
    holds alternatives (``or``, ``\\lor``, ``\\vee``), the completion committed to several
    final answers and gets 0. Repeating the same boxed answer is fine; corrections belong in the
    thinking, before ``</think>``;
  - otherwise the last sentence of the region that holds a number or a ``$...$`` expression, and
    only its last such candidate ("The answer is 42. Actually... maybe 7." is graded as 7); if that
    sentence offers alternatives (``or`` between different candidates) the completion gets 0.
* Equivalence is ``math_verify.verify(gold, pred)`` on the graded answer alone.
* Every item runs in a worker process of :class:`rewards.pool.GraderPool`; an item that exceeds
  ``timeout`` seconds gets 0.0 and its worker is killed and replaced. math-verify's own
  ``signal.alarm`` timeouts stay on inside the workers (each worker grades in its main thread),
  set below the hard timeout so that most slow items end without a kill. So the reward is safe to
  call from any thread and never hangs or raises.
* Model text is only ever parsed (by math-verify's LaTeX/sympy parser), never executed.
"""

from __future__ import annotations

import math as _stdlib_math  # noqa: F401 - this module is rewards.math; stdlib math is unaffected
import os
import re
from typing import Any

from rewards.pool import get_pool
from rewards.registry import register_reward
from rewards.text import column, completion_text, gradable_region

DEFAULT_TIMEOUT = float(os.environ.get("RLMEM_MATH_TIMEOUT", "5"))
TAIL_CHARS = 4000
MAX_GOLD_CHARS = 1000
_FUNC = "rewards.math:_grade_in_worker"
_pool_workers: int | None = None


def normalize_gold(answer: Any) -> str | None:
    """Gold answer as a string: 27.0 -> "27"; lists take their first element; None if unusable."""
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else None
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, float):
        if not _stdlib_math.isfinite(answer):
            return None
        return str(int(answer)) if answer.is_integer() else repr(answer)
    if isinstance(answer, int):
        return str(answer)
    if hasattr(answer, "item"):
        return normalize_gold(answer.item())
    s = str(answer).strip()
    return s[:MAX_GOLD_CHARS] if s else None


def _grade_in_worker(gold: str, region: str, inner_timeout: int) -> float:
    """Runs inside a grader process (main thread): parse gold and prediction, verify."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_text = gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"
    gold_parsed = parse(gold_text, extraction_config=gold_cfg, parsing_timeout=inner_timeout)
    if not gold_parsed:
        gold_parsed = parse(gold, extraction_config=[ExprExtractionConfig()], parsing_timeout=inner_timeout)
    if not gold_parsed:
        return 0.0
    pred_cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    pred = parse(region, extraction_config=pred_cfg, parsing_timeout=inner_timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold_parsed, pred, timeout_seconds=inner_timeout) else 0.0


def configure(num_workers: int | None = None) -> None:
    """Set the number of grader processes used by the shared math pool (before first use)."""
    global _pool_workers
    _pool_workers = num_workers


def grader_pool():
    """The shared process pool that grades math answers (benchmarks time it directly)."""
    return get_pool("math", num_workers=_pool_workers, preload=("math_verify", "sympy"))


def last_boxed(text: str) -> str | None:
    """``\\boxed{...}`` of the last balanced ``\\boxed{`` in ``text`` (linear time), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        while i < len(text):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i + 1]
            i += 1
        # unbalanced: try an earlier one (bounded: at most a few tries)
        start = text.rfind("\\boxed{", 0, start) if start > 0 and text.count("\\boxed{", 0, start) < 8 else -1
    return None


_ALTERNATIVES = re.compile(r"\\lor\b|\\vee\b|\\text\{\s*or\s*\}|\bor\b|\\mathrm\{\s*or\s*\}", re.I)
_CANDIDATE = re.compile(r"\$[^$]+\$|\\\(.+?\\\)|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def all_boxed(text: str, limit: int = 64) -> list[str]:
    """Contents of the balanced ``\\boxed{...}`` in ``text``, in order (at most ``limit``; linear time)."""
    out, i = [], 0
    while len(out) < limit:
        start = text.find("\\boxed{", i)
        if start < 0:
            break
        depth, j = 0, start + len("\\boxed")
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth != 0:
            break   # unbalanced: nothing after it can close either
        out.append(text[start + len("\\boxed{"):j])
        i = j + 1
    return out


def _norm(answer: str) -> str:
    return re.sub(r"\s+|\$|\\[,;!]|\\left|\\right", "", answer)


def final_answer(region: str) -> str | None:
    """The one answer graded in ``region`` per the module's rule, or None (none, or several)."""
    boxes = all_boxed(region)
    if boxes:
        last = boxes[-1]
        if len({_norm(b) for b in boxes if _norm(b)}) > 1 or _ALTERNATIVES.search(last):
            return None
        return f"$\\boxed{{{last}}}$"
    if "\\boxed" in region:   # a box that never closes: the answer is not readable
        return None
    for sentence in reversed([x for x in _SENTENCE_END.split(region) if x.strip()]):
        cands = _CANDIDATE.findall(sentence)
        if not cands:
            continue
        if len({_norm(c) for c in cands}) > 1 and _ALTERNATIVES.search(sentence):
            return None
        c = cands[-1]
        return c if c.startswith(("$", "\\(")) else f"${c}$"
    return None


def prepare(completion: Any, tail_chars: int = TAIL_CHARS) -> str | None:
    """The text graded for one completion: its :func:`final_answer` (None: nothing to grade, or hedged)."""
    region = gradable_region(completion_text(completion))
    if region is None or not region.strip():
        return None
    return final_answer(region[-tail_chars:])


@register_reward("math")
def math_reward(completions: list, answer: list | None = None, *, timeout: float | None = None,
                soft_timeout: int | None = None, tail_chars: int = TAIL_CHARS, **kwargs) -> list[float]:
    """TRL reward function for math: 1.0 if the final answer is equivalent to ``answer``.

    ``answer`` is the gold column (list over the batch); ``solution``/``ground_truth`` are
    accepted as aliases. ``timeout`` is the hard wall-clock limit per item (default 5 s, env
    ``RLMEM_MATH_TIMEOUT``); ``soft_timeout`` is math-verify's own per-call alarm inside the worker
    (default 60% of ``timeout``, at least 1 s; 0 disables it and leaves only the hard kill).
    """
    completions = list(completions)
    n = len(completions)
    golds = column(dict(kwargs, answer=answer), ("answer", "ground_truth", "solution"), n)
    hard = float(DEFAULT_TIMEOUT if timeout is None else timeout)
    inner = max(1, int(hard * 0.6)) if soft_timeout is None else int(soft_timeout)
    rewards = [0.0] * n
    jobs, where = [], []
    for i, (c, g) in enumerate(zip(completions, golds)):
        try:
            gold = normalize_gold(g)
            region = prepare(c, tail_chars)
        except Exception:  # noqa: BLE001
            continue
        if gold is None or region is None:
            continue
        jobs.append((gold, region, inner))
        where.append(i)
    if jobs:
        out = grader_pool().map(_FUNC, jobs, timeout=hard, default=0.0)
        for i, r in zip(where, out):
            try:
                rewards[i] = float(r)
            except Exception:  # noqa: BLE001
                rewards[i] = 0.0
    return rewards

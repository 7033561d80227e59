"""Countdown verifier: an AST walk with exact fractions; nothing from the model is executed.

Grading rules (binary by default):

1. The gradable region is the text after the last ``</think>`` (the whole text without thinking
   markup; nothing if a ``<think>`` is never closed). Only the **last** complete
   ``<answer>...</answer>`` in it is graded.
2. The answer must be at most ``max_answer_chars`` characters of ASCII digits, ``+ - * /``,
   parentheses and whitespace (so no decimals, names, calls, ``%``, ``=``, unicode digits/minus).
3. It is parsed with :func:`ast.parse` (``mode="eval"``) and walked: only integer literals,
   binary ``+ - * /``, unary minus and parentheses are admitted (``**`` and ``//`` are rejected as
   AST nodes ``Pow``/``FloorDiv``).
4. The multiset of integer literals must equal the multiset of given numbers (each used exactly
   once), checked *before* any arithmetic.
5. The value, computed with :class:`fractions.Fraction` (division by zero -> wrong), must equal
   the target exactly.

Correct -> ``correct_score`` (1.0). A present but wrong/invalid answer -> ``format_score``
(0.0 by default; TinyZero used 0.1). No answer -> 0.0. Time is bounded by the length cap.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Any, Sequence

from rewards.registry import register_reward
from rewards.text import column, completion_text, gradable_region, last_answer_tag

MAX_ANSWER_CHARS = 256
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/()\s]*")


class InvalidExpression(ValueError):
    pass


def _literals_and_check(node: ast.AST, out: list[int], depth: int = 0) -> None:
    if depth > 100:
        raise InvalidExpression("expression nested too deeply")
    if isinstance(node, ast.Expression):
        return _literals_and_check(node.body, out, depth + 1)
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:  # bool is excluded too; floats cannot pass the char filter
            raise InvalidExpression(f"non-integer literal {node.value!r}")
        out.append(node.value)
        return None
    if isinstance(node, ast.BinOp):
        if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            raise InvalidExpression(f"operator {type(node.op).__name__} not allowed")
        _literals_and_check(node.left, out, depth + 1)
        _literals_and_check(node.right, out, depth + 1)
        return None
    if isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.USub):
            raise InvalidExpression(f"unary {type(node.op).__name__} not allowed")
        _literals_and_check(node.operand, out, depth + 1)
        return None
    raise InvalidExpression(f"{type(node).__name__} not allowed")


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        return -_evaluate(node.operand)
    assert isinstance(node, ast.BinOp)
    a, b = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Add):
        return a + b
    if isinstance(node.op, ast.Sub):
        return a - b
    if isinstance(node.op, ast.Mult):
        return a * b
    if b == 0:
        raise InvalidExpression("division by zero")
    return a / b


def parse_equation(expr: str, max_chars: int = MAX_ANSWER_CHARS) -> tuple[ast.Expression, list[int]]:
    """Parse and validate ``expr``; return its AST and integer literals. Raises InvalidExpression."""
    if not isinstance(expr, str):
        raise InvalidExpression("not a string")
    expr = expr.strip()
    if not expr:
        raise InvalidExpression("empty expression")
    if len(expr) > max_chars:
        raise InvalidExpression(f"expression longer than {max_chars} characters")
    if not _ALLOWED_CHARS.fullmatch(expr) or not expr.isascii():
        raise InvalidExpression("characters outside digits, + - * /, parentheses and spaces")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise InvalidExpression(f"syntax: {e}") from None
    literals: list[int] = []
    _literals_and_check(tree, literals)
    return tree, literals


def evaluate_equation(expr: str, numbers: Sequence[int] | None = None,
                      max_chars: int = MAX_ANSWER_CHARS) -> Fraction:
    """Exact value of ``expr`` after validation (and the multiset check when ``numbers`` given)."""
    tree, literals = parse_equation(expr, max_chars)
    if numbers is not None and Counter(literals) != Counter(int(x) for x in numbers):
        raise InvalidExpression(f"numbers used {sorted(literals)} != given {sorted(int(x) for x in numbers)}")
    try:
        return _evaluate(tree)
    except RecursionError:
        raise InvalidExpression("expression nested too deeply") from None


def _as_int_list(numbers: Any) -> list[int] | None:
    try:
        if hasattr(numbers, "tolist"):
            numbers = numbers.tolist()
        if isinstance(numbers, str):
            numbers = [int(x) for x in re.findall(r"-?\d+", numbers)]
        out = []
        for x in numbers:
            if isinstance(x, bool) or int(x) != x:
                return None
            out.append(int(x))
        return out
    except Exception:  # noqa: BLE001
        return None


def _as_fraction(target: Any) -> Fraction | None:
    try:
        if isinstance(target, bool):
            return None
        if isinstance(target, str):
            target = target.strip()
        return Fraction(target)
    except Exception:  # noqa: BLE001
        return None


def score_countdown(completion: Any, target: Any, numbers: Any, *, format_score: float = 0.0,
                    correct_score: float = 1.0, max_answer_chars: int = MAX_ANSWER_CHARS) -> float:
    """Reward of one completion (never raises)."""
    try:
        region = gradable_region(completion_text(completion))
        if region is None:
            return 0.0
        answer = last_answer_tag(region)
        if answer is None:
            return 0.0
        nums, tgt = _as_int_list(numbers), _as_fraction(target)
        if nums is None or tgt is None:
            return 0.0
        try:
            value = evaluate_equation(answer, nums, max_answer_chars)
        except InvalidExpression:
            return float(format_score)
        return float(correct_score) if value == tgt else float(format_score)
    except Exception:  # noqa: BLE001 - garbage in, zero out
        return 0.0


@register_reward("countdown")
def countdown_reward(completions: list, target: list | None = None, numbers: list | None = None,
                     *, format_score: float = 0.0, correct_score: float = 1.0,
                     max_answer_chars: int = MAX_ANSWER_CHARS, **kwargs) -> list[float]:
    """TRL reward function for Countdown: one float per completion.

    ``target`` and ``numbers`` are dataset columns (lists over the batch); ``nums`` (the name in
    ``Jiayi-Pan/Countdown-Tasks-3to4``) is accepted for ``numbers``.
    """
    completions = list(completions)
    n = len(completions)
    kw = dict(kwargs, target=target, numbers=numbers)
    targets = column(kw, ("target",), n)
    nums = column(kw, ("numbers", "nums"), n)
    return [score_countdown(c, t, s, format_score=format_score, correct_score=correct_score,
                            max_answer_chars=max_answer_chars)
            for c, t, s in zip(completions, targets, nums)]

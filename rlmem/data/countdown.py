"""Countdown problems: a seeded generator that guarantees solvability, and an exact solver.

A problem is ``numbers`` (3–4 integers in 1–99 by default) and a ``target`` (10–100 by default);
a solution is an expression using every number exactly once with ``+ - * /`` and parentheses,
evaluated exactly (intermediate fractions allowed, as the verifier allows them). The generator
draws a target and numbers, runs :func:`solve`, and keeps the problem only if a solution exists;
the solution found is stored with the problem.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Sequence

_OPS = ("+", "-", "*", "/")


def reachable(numbers: Sequence[int]) -> dict[Fraction, str]:
    """Every value reachable using **all** of ``numbers`` exactly once -> one expression for it.

    Subset dynamic programming over bitmasks with exact fractions (for 4 numbers, a few thousand
    values; milliseconds).
    """
    nums = [int(x) for x in numbers]
    n = len(nums)
    table: dict[int, dict[Fraction, str]] = {1 << i: {Fraction(v): str(v)} for i, v in enumerate(nums)}
    for mask in sorted(range(1, 1 << n), key=lambda m: bin(m).count("1")):
        if mask in table and bin(mask).count("1") == 1:
            continue
        vals: dict[Fraction, str] = {}
        sub = (mask - 1) & mask
        while sub:
            other = mask ^ sub
            if sub < other:  # each unordered split once; non-commutative ops done both ways
                for a, ea in table[sub].items():
                    for b, eb in table[other].items():
                        for v, e in ((a + b, f"({ea} + {eb})"), (a * b, f"({ea} * {eb})"),
                                     (a - b, f"({ea} - {eb})"), (b - a, f"({eb} - {ea})")):
                            vals.setdefault(v, e)
                        if b:
                            vals.setdefault(a / b, f"({ea} / {eb})")
                        if a:
                            vals.setdefault(b / a, f"({eb} / {ea})")
            sub = (sub - 1) & mask
        table[mask] = vals
    return table.get((1 << n) - 1, {})


def _strip_outer(expr: str) -> str:
    if expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, ch in enumerate(expr):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr
        return expr[1:-1]
    return expr


def solve(numbers: Sequence[int], target: int) -> str | None:
    """One expression using every number once that equals ``target`` exactly, or None."""
    if not len(numbers):
        return None
    found = reachable(numbers).get(Fraction(target))
    return None if found is None else _strip_outer(found)


def countdown_prompt_text(numbers: Sequence[int], target: int) -> str:
    """The task statement (no instruction, no template)."""
    return f"Using the numbers {list(int(x) for x in numbers)}, create an equation that equals {int(target)}."


def generate_countdown(num_examples: int = 1000, *, seed: int = 0, num_numbers: tuple[int, int] = (3, 4),
                       number_range: tuple[int, int] = (1, 99), target_range: tuple[int, int] = (10, 100),
                       max_tries_per_example: int = 1000, targets_per_draw: int = 20) -> list[dict]:
    """``num_examples`` solvable problems, deterministic given ``seed`` (ranges are inclusive).

    Each example: ``{"id", "prompt", "reward": "countdown", "task": "countdown", "target",
    "numbers", "solution"}``. Targets are drawn uniformly; each draw of numbers is tried against up
    to ``targets_per_draw`` targets before new numbers are drawn.
    """
    lo_n, hi_n = (num_numbers, num_numbers) if isinstance(num_numbers, int) else tuple(num_numbers)
    if not (1 <= lo_n <= hi_n <= 6):
        raise ValueError(f"num_numbers must be within 1..6 (got {num_numbers})")
    if number_range[0] > number_range[1] or target_range[0] > target_range[1]:
        raise ValueError(f"empty range: number_range={number_range}, target_range={target_range}")
    rng = random.Random(seed)
    out = []
    for idx in range(int(num_examples)):
        for _ in range(max_tries_per_example):
            k = rng.randint(lo_n, hi_n)
            numbers = [rng.randint(*number_range) for _ in range(k)]
            values = reachable(numbers)
            sol = None
            for _ in range(targets_per_draw):
                target = rng.randint(*target_range)
                if Fraction(target) in values:
                    sol = _strip_outer(values[Fraction(target)])
                    break
            if sol is not None:
                break
        else:
            raise RuntimeError(f"no solvable Countdown problem found in {max_tries_per_example} tries "
                               f"(num_numbers={num_numbers}, number_range={number_range}, target_range={target_range})")
        out.append({"id": f"countdown-gen-{seed}-{idx}", "prompt": countdown_prompt_text(numbers, target),
                    "reward": "countdown", "task": "countdown", "target": target, "numbers": numbers,
                    "solution": sol})
    return out

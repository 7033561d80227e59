"""The toy Countdown task: 3 small numbers, a word-level format, and solver search traces.

It exists so that NGC can be shown learning on 2 CPU cores (docs/toy-reproduction.md). Problems are
every (numbers 1-10, target 10-99) that an integer-only search solves (every intermediate value a
positive integer), each checked against the repo's exact solver (rlmem/data/countdown.py). Each word is one token of the toy tokenizer (rlmem/toy/tokenizer.py), so a
prompt is ``3 5 7 : 22`` (a dozen tokens once templated).

A **search trace** is a depth-first search in random order: a branch combines two numbers
(``3 + 5 = 8 ;``), its leaves combine that result with the third number and compare the value
with the target (``8 * 7 = 56 > ,``: ``<``, ``>`` or ``=``), and the search stops at the first leaf
equal to the target, then answers in the verifier's format::

    3 + 5 = 8 ; 8 + 7 = 15 < , 8 * 7 = 56 > , 8 - 7 = 1 < , 3 * 5 = 15 ; 15 + 7 = 22 = </think>
    <answer> ( 3 * 5 ) + 7 </answer>

Why the comparison: the stop decision (is this value the target?) is one label per trace, too
rare for a tiny model to learn from imitation (a first warm start without comparisons put
P(stop) at 0.23 on hits and 0.11 on misses). Comparing every leaf trains the same look-up of the
target at every leaf, and it keeps the target necessary: the comparisons never state it.

Traces run to ~150 tokens on average, several times the steady-state cache of the toy
config (δ/ε = 32), and they need early information: the target (only in the prompt) decides
when to stop, the third number is in the prompt, and the branches already tried decide which
one to try next. So what a model evicts is a real choice.

Train/test split: a problem ``(target, sorted numbers)`` is in ``test`` iff a hash of it is
``0 mod 10``; the splits are disjoint by construction, whatever the seeds.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from dataclasses import dataclass

from rlmem.data.countdown import solve

TASK = "countdown-toy"
NUMBER_RANGE = (1, 10)
TARGET_RANGE = (10, 99)
MAX_VALUE = 1000           # largest number word in the toy vocabulary (10 * 10 * 10)
BRANCH_END, LEAF_END = ";", ","
COMPARISONS = ("<", ">", "=")   # leaf value below, above, equal to the target


def prompt_text(numbers: list[int], target: int) -> str:
    return " ".join(str(n) for n in numbers) + f" : {int(target)}"


def split_of(numbers: list[int], target: int) -> str:
    key = f"{int(target)}|{','.join(str(n) for n in sorted(numbers))}".encode()
    return "test" if int(hashlib.sha1(key).hexdigest(), 16) % 10 == 0 else "train"


@dataclass(frozen=True)
class Step:
    left: int
    op: str
    right: int
    value: int

    def text(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.value}"


def combine(a: int, b: int) -> list[Step]:
    """Every way to combine two positive integers into a positive integer (bigger operand first
    for - and /, so every value stays a positive integer)."""
    hi, lo = max(a, b), min(a, b)
    out = [Step(a, "+", b, a + b), Step(a, "*", b, a * b)]
    if hi > lo:
        out.append(Step(hi, "-", lo, hi - lo))
    if lo > 0 and hi % lo == 0 and lo > 1:
        out.append(Step(hi, "/", lo, hi // lo))
    return out


def branches(numbers: list[int]) -> list[tuple[Step, int]]:
    """(first step, remaining number) for every pair of the three numbers."""
    out = []
    for i in range(3):
        for j in range(i + 1, 3):
            rest = numbers[3 - i - j]
            out += [(s, rest) for s in combine(numbers[i], numbers[j])]
    return out


def answer_expr(first: Step, leaf: Step) -> str:
    inner = f"( {first.text().rsplit(' = ', 1)[0]} )"
    if leaf.left == first.value:
        return f"{inner} {leaf.op} {leaf.right}"
    return f"{leaf.left} {leaf.op} {inner}"


def solutions(numbers: list[int], target: int) -> list[str]:
    return [answer_expr(b, leaf) for b, rest in branches(numbers) for leaf in combine(b.value, rest)
            if leaf.value == target]


def compare(value: int, target: int) -> str:
    return COMPARISONS[0] if value < target else COMPARISONS[1] if value > target else COMPARISONS[2]


def search_trace(numbers: list[int], target: int, rng: random.Random) -> str | None:
    """A random-order depth-first search trace ending in the answer, or None if none exists."""
    order = branches(numbers)
    rng.shuffle(order)
    words: list[str] = []
    for first, rest in order:
        words += [first.text(), BRANCH_END]
        leaves = combine(first.value, rest)
        rng.shuffle(leaves)
        for leaf in leaves:
            words += [leaf.text(), compare(leaf.value, target), LEAF_END]
            if leaf.value == target:
                words[-1] = "</think>"
                return " ".join(words) + f" <answer> {answer_expr(first, leaf)} </answer>"
    return None


@functools.lru_cache(maxsize=2)
def all_problems(split: str) -> tuple[tuple[tuple[int, int, int], int], ...]:
    """Every (sorted numbers, target) of ``split`` that the integer search solves (checked against
    the repo's exact solver), in a fixed order; computed once per process (about a second)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    out = []
    for nums in itertools.combinations_with_replacement(range(NUMBER_RANGE[0], NUMBER_RANGE[1] + 1), 3):
        for tgt in range(TARGET_RANGE[0], TARGET_RANGE[1] + 1):
            if split_of(list(nums), tgt) == split and solutions(list(nums), tgt):
                assert solve(nums, tgt) is not None
                out.append((nums, tgt))
    return tuple(out)


def toy_problems(split: str, num_examples: int | None = None, seed: int = 0) -> list[dict]:
    """``num_examples`` distinct problems of ``split`` (all if None) in a seeded random order, the
    numbers of each shuffled; different seeds give different samples of the same split."""
    rng = random.Random(seed)
    pool = list(all_problems(split))
    rng.shuffle(pool)
    if num_examples is not None:
        if num_examples > len(pool):
            raise ValueError(f"the toy {split} split has {len(pool)} problems (asked for {num_examples})")
        pool = pool[:num_examples]
    out = []
    for i, (nums, tgt) in enumerate(pool):
        numbers = list(nums)
        rng.shuffle(numbers)
        out.append({"id": f"{TASK}-{split}-{seed}-{i}", "prompt": prompt_text(numbers, tgt), "reward": "countdown",
                    "task": TASK, "target": tgt, "numbers": numbers})
    return out

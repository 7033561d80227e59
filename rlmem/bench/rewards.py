"""Grading throughput of the Countdown and math verifiers, and the time of a batch with hanging items.

Grades ``--n`` mixed completions (correct, wrong, malformed, adversarial) per verifier and prints
completions/second; then grades a math batch in which ``--hangs`` items hang (math-verify's own
alarm switched off so only the hard kill stops them) and prints its wall time next to the bound
``ceil(hangs / workers) * timeout`` (the hang itself would last far longer).
"""

from __future__ import annotations

import argparse
import random
import time


def _countdown_batch(n: int, seed: int):
    from rlmem.data.countdown import generate_countdown

    rng = random.Random(seed)
    probs = generate_countdown(min(n, 200), seed=seed)
    comps, targets, numbers = [], [], []
    kinds = ["correct", "wrong", "decimal", "power", "missing", "think_only", "garbage", "long"]
    for i in range(n):
        e = probs[i % len(probs)]
        k = kinds[i % len(kinds)]
        nums = e["numbers"]
        text = {"correct": f"<think>let me try</think><answer>{e['solution']}</answer>",
                "wrong": f"</think><answer>{' + '.join(map(str, nums))}</answer>",
                "decimal": f"</think><answer>{nums[0]}.5 * {nums[1]}</answer>",
                "power": f"</think><answer>{nums[0]} ** {nums[1]}</answer>",
                "missing": f"</think><answer>{nums[0]} + {nums[1]}</answer>",
                "think_only": f"<think><answer>{e['solution']}</answer></think>",
                "garbage": "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(200)),
                "long": "<think>" + "hmm " * 2000 + f"</think><answer>{e['solution']}</answer>"}[k]
        comps.append(text)
        targets.append(e["target"])
        numbers.append(nums)
    return comps, targets, numbers


def _math_batch(n: int, seed: int):
    rng = random.Random(seed)
    comps, answers = [], []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        k = i % 6
        text = {0: f"<think>compute</think>The answer is $\\boxed{{{a + b}}}$.",
                1: f"</think>So $\\boxed{{\\frac{{{2 * (a + b)}}}{{2}}}}$",
                2: f"</think>\\boxed{{{a + b + 1}}}",
                3: f"<think>\\boxed{{{a + b}}}</think> no idea",
                4: f"</think>Answer: {a + b}",
                5: "</think>" + "\\left(" * 50 + "x"}[k]
        comps.append(text)
        answers.append(str(a + b))
    return comps, answers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlmem.commands.common import above_zero, at_least

    parser.add_argument("--n", type=at_least(1), default=1000, help="completions per verifier (default 1000)")
    parser.add_argument("--workers", type=at_least(1), default=None, help="math grader processes (default min(4, cpus))")
    parser.add_argument("--timeout", type=above_zero, default=2.0, help="hard per-item timeout for the hang test (s)")
    parser.add_argument("--hangs", type=at_least(0), default=4, help="hanging items in the hang batch (0: none)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import math

    from rewards import countdown_reward, math_reward
    from rewards import math as rmath

    rmath.configure(args.workers)
    pool = rmath.grader_pool()
    math_reward(["\\boxed{1}"] * pool.num_workers, answer=["1"] * pool.num_workers)  # warm-up: start workers

    comps, targets, numbers = _countdown_batch(args.n, args.seed)
    t = time.perf_counter()
    r = countdown_reward(comps, target=targets, numbers=numbers)
    dt = time.perf_counter() - t
    print(f"countdown: {len(comps)} completions in {dt:.3f} s = {len(comps) / dt:,.0f} completions/s "
          f"(mean reward {sum(r) / len(r):.3f})")

    mcomps, answers = _math_batch(args.n, args.seed)
    t = time.perf_counter()
    r = math_reward(mcomps, answer=answers)
    dt = time.perf_counter() - t
    print(f"math:      {len(mcomps)} completions in {dt:.3f} s = {len(mcomps) / dt:,.0f} completions/s "
          f"({pool.num_workers} worker processes; mean reward {sum(r) / len(r):.3f})")

    hang = "</think>\\boxed{9^{9^{9^{9}}}}"
    batch = [hang] * args.hangs + ["</think>\\boxed{4}"] * 60
    golds = ["1"] * args.hangs + ["4"] * 60
    kills0 = pool.kills
    t = time.perf_counter()
    r = math_reward(batch, answer=golds, timeout=args.timeout, soft_timeout=0)
    dt = time.perf_counter() - t
    bound = math.ceil(args.hangs / pool.num_workers) * args.timeout
    ok = r == [0.0] * args.hangs + [1.0] * 60
    print(f"hang batch: {len(batch)} items incl. {args.hangs} hanging, timeout {args.timeout:g} s: "
          f"{dt:.2f} s (bound ceil(hangs/workers)*timeout = {bound:.1f} s + grading); "
          f"{pool.kills - kills0} workers killed and replaced; rewards {'correct' if ok else 'WRONG'}")
    return 0 if ok else 1

"""Paired comparison of two methods on the toy test problems, over any number of evaluation seeds.

    python scripts/compare_toy.py EPS A_METHOD A_DIR... -- B_METHOD B_DIR...

Each DIR is an ``rlmem eval`` directory (its ``records/`` and ``results.json``); the seed of each
is read from its settings, and A and B need the same seeds. Every seed evaluates the same toy test
problems (docs/toy-reproduction.md, "Session 7"), so the fair test of "A beats B" pairs them: per
problem, A's success rate over all its samples minus B's, and the standard error of the mean of
those differences over problems. Prints that, and the same per seed.
"""

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from rlmem.data.toy import toy_problems
from rlmem.eviction.record import read_jsonl


def successes(method: str, eps: float, dirs: list[str]) -> dict[int, dict[tuple, list[float]]]:
    """seed -> problem (sorted numbers, target) -> rewards of its samples."""
    out: dict[int, dict[tuple, list[float]]] = {}
    for d in map(Path, dirs):
        name = "full.jsonl" if method == "full" else f"{method}_eps{eps:g}.jsonl"
        for need in (d / "results.json", d / "records" / name):
            if not need.is_file():
                sys.exit(f"error: {need} is missing: is {d} a finished `rlmem eval` directory with {method} at ε = {eps:g}?")
        seed = json.loads((d / "results.json").read_text())["settings"]["seed"]
        problems = toy_problems("test", seed=seed)
        by_problem = defaultdict(list)
        for r in read_jsonl(d / "records" / name):
            p = problems[r.extra["problem_index"]]
            by_problem[(tuple(sorted(p["numbers"])), p["target"])].append(float(r.reward or 0.0))
        out[seed] = by_problem
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def paired(a: dict[tuple, list[float]], b: dict[tuple, list[float]]) -> tuple[tuple, tuple, tuple]:
    if set(a) != set(b):
        sys.exit("error: the two methods were evaluated on different problems")
    keys = sorted(a)
    ra = [sum(a[k]) / len(a[k]) for k in keys]
    rb = [sum(b[k]) / len(b[k]) for k in keys]
    return mean_se(ra), mean_se(rb), mean_se([x - y for x, y in zip(ra, rb)])


def main(argv: list[str]) -> None:
    if "--" not in argv or len(argv) < 6:
        sys.exit(__doc__)
    cut = argv.index("--")
    eps, (ma, *da), (mb, *db) = float(argv[0]), argv[1:cut], argv[cut + 1:]
    a, b = successes(ma, eps, da), successes(mb, eps, db)
    if sorted(a) != sorted(b):
        sys.exit(f"error: seeds differ: {ma} {sorted(a)}, {mb} {sorted(b)}")
    rows = [(f"seed {s}", a[s], b[s]) for s in sorted(a)]
    pool = lambda x: {k: [v for s in sorted(x) for v in x[s][k]] for k in x[sorted(x)[0]]}
    rows.append((f"seeds {','.join(map(str, sorted(a)))}", pool(a), pool(b)))
    for label, xa, xb in rows:
        (pa, sa), (pb, sb), (d, sd) = paired(xa, xb)
        print(f"{label:>14}: {ma} {pa:.1%} ± {sa:.1%} | {mb} {pb:.1%} ± {sb:.1%} | "
              f"paired difference {d * 100:+.1f} ± {sd * 100:.1f} points ({d / sd:+.1f} SE)")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Math verifier: math-verify in a process pool with hard kills; adversarial suite."""

from __future__ import annotations

import threading
import time


from rewards import math_reward
from rewards.math import normalize_gold
from rewards.pool import GraderPool


def grade(texts, answers, **kw):
    return math_reward(texts, answer=answers, **kw)


def test_correct_and_wrong():
    texts = ["<think>hmm</think> The answer is $\\boxed{\\frac{1}{2}}$.",
             "</think>So we get \\boxed{34}.",
             "\\boxed{0.5}",
             "</think>\\boxed{35}",
             "</think> \\boxed{2\\sqrt{2}}",
             "</think> Final: $\\boxed{27}$"]
    assert grade(texts, ["\\frac{1}{2}", "34", "1/2", "34", "\\sqrt{8}", 27.0]) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_adversarial():
    cases = [
        ("\\boxed{\\boxed{5}}", "5", 1.0),                                     # nested boxed
        ("<think>clearly \\boxed{5}</think> I think \\boxed{6}", "5", 0.0),    # answer before </think>
        ("<think>clearly \\boxed{5}", "5", 0.0),                               # think never closed
        ("<think>\\boxed{5}</think>", "5", 0.0),                               # nothing after </think>
        ("</think>\\boxed{6} no wait, \\boxed{5}", "5", 0.0),                  # two final answers: hedged
        ("</think>\\boxed{5}. So again: \\boxed{ 5 }", "5", 1.0),              # the same answer twice
        ("", "5", 0.0),
        ("\\boxed{}", "5", 0.0),
        ("\\boxed{\\frac{1}{0}}", "5", 0.0),
        ("\\boxed{" * 2000 + "5", "5", 0.0),                                   # unbalanced braces
        ("\\boxed{\\left(\\right.\\left\\{\\begin{matrix}", "5", 0.0),        # pathological LaTeX
        ("\\boxed{2^{2^{2^{2^{2^{100}}}}}}", "3", 0.0),                        # huge power
        ("\\boxed{(10^{7})!}", "1", 0.0),
        ("\\boxed{__import__('os').system('touch /tmp/rlmem_pwned')}", "0", 0.0),
        ("\\boxed{５}", "5", 0.0 if False else None),                          # full-width digit: any, no crash
        ("\x00\x01\ud800", "5", 0.0),
    ]
    out = grade([c[0] for c in cases], [c[1] for c in cases], timeout=4)
    for (text, gold, want), got in zip(cases, out):
        assert got in (0.0, 1.0)
        if want is not None:
            assert got == want, (text[:60], gold, got)
    import os
    assert not os.path.exists("/tmp/rlmem_pwned")


def test_garbage_never_raises():
    out = grade([None, 5, {"role": "assistant"}, [{"role": "assistant", "content": "\\boxed{3}"}], "\\boxed{3}"],
                [None, "5", float("nan"), 3, ""])
    assert out == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert normalize_gold(27.0) == "27" and normalize_gold(2.5) == "2.5" and normalize_gold([7]) == "7"


def test_hang_is_killed_within_timeout():
    # soft_timeout=0 switches math-verify's own alarm off, so only the hard kill can stop these
    hang = "\\boxed{9^{9^{9^{9}}}}"
    texts = [hang, "\\boxed{4}", hang, "\\boxed{7}"]
    t = time.perf_counter()
    out = grade(texts, ["1", "4", "1", "7"], timeout=1.5, soft_timeout=0)
    dt = time.perf_counter() - t
    assert out == [0.0, 1.0, 0.0, 1.0]
    assert dt < 1.5 * 2 + 2.0, dt  # two hanging items, at least 2 workers... bounded by the timeout
    # the pool recovered: workers were replaced
    assert grade(["\\boxed{4}"], ["4"]) == [1.0]


def test_from_threads():
    results, errors = [], []

    def work(i):
        try:
            results.append(grade([f"\\boxed{{{i}}}", "\\boxed{0}"], [str(i), "1"]))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(results) == [[1.0, 0.0]] * 4


def test_pool_hard_kill_and_replacement():
    with GraderPool(2) as pool:
        t = time.perf_counter()
        out = pool.map("time:sleep", [(30,), (0,), (30,), (0,), (0,)], timeout=0.5, default="killed")
        dt = time.perf_counter() - t
        assert out == ["killed", None, "killed", None, None]
        assert dt < 5, dt
        assert pool.kills == 2
        # worker crash (os._exit) -> default, and the pool keeps working
        assert pool.map("os:_exit", [(3,)], timeout=5, default="dead") == ["dead"]
        assert pool.map("builtins:divmod", [(7, 2)], timeout=5) == [(3, 1)]
        # exceptions (including BaseException) -> default
        assert pool.map("sys:exit", [(1,)], timeout=5, default="err") == ["err"]
        assert pool.map("builtins:int", [("x",)], timeout=5, default="err") == ["err"]


# ---------------------------------------------------------------------------------------------
# Hedging (issue 11, item 12): exactly one final answer is graded; several different ones get 0.

HEDGES = [
    # (completion, gold, reward): patterns a policy under RL finds when any candidate may match
    ("The answer is 42. Actually... maybe 7.", "42", 0.0),               # the example: 7 is graded
    ("The answer is 42. Actually... maybe 7.", "7", 1.0),                #   (committing to 7 is fine)
    ("The answer is 42 or 7.", "42", 0.0),                              # alternatives in the last sentence
    ("It is either 7 or 42.", "7", 0.0),
    ("Final answer: 42 (or possibly 7)", "42", 0.0),
    ("</think>\\boxed{42} or \\boxed{7}", "42", 0.0),                   # two boxes
    ("</think>\\boxed{42}\n\nWait, maybe \\boxed{7}", "7", 0.0),
    ("</think>\\boxed{42 \\text{ or } 7}", "42", 0.0),                  # alternatives inside the box
    ("</think>\\boxed{42 \\lor 7}", "7", 0.0),
    ("</think>\\boxed{42 \\vee 7}", "42", 0.0),
    ("</think>$\\boxed{42}$ or $\\boxed{7}$ or $\\boxed{13}$", "13", 0.0),
    ("Candidates: 7, 13, 42. The answer is 42.", "42", 1.0),            # a committed last sentence
    ("We get 3 + 4 = 7, so the answer is \\boxed{7}.", "7", 1.0),       # numbers in the work are not answers
    ("x = 1 or x = 2, but only x = 2 works. So \\boxed{2}", "2", 1.0),   # alternatives before one box: fine
]


def test_hedged_completions_get_zero_and_committed_ones_are_graded():
    out = grade([c for c, _, _ in HEDGES], [g for _, g, _ in HEDGES], timeout=4)
    for (text, gold, want), got in zip(HEDGES, out):
        assert got == want, (text, gold, got)


def test_final_answer_rule():
    from rewards.math import all_boxed, final_answer

    assert all_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c \\boxed{") == ["1", "\\frac{1}{2}"]
    assert final_answer("so \\boxed{\\frac{1}{2}}") == "$\\boxed{\\frac{1}{2}}$"
    assert final_answer("The answer is 42. Actually... maybe 7.") == "$7$"
    assert final_answer("It is $x^2$ or $x^3$.") is None
    assert final_answer("no numbers here") is None
    assert final_answer("\\boxed{5") is None   # a box that never closes is not read as a plain 5

"""Countdown verifier: correct answers pass, every known exploit of the usual grader fails."""

from __future__ import annotations

import builtins
import threading
import time

import pytest

import rewards
from rewards import countdown_reward, get_reward
from rewards.countdown import InvalidExpression, evaluate_equation, score_countdown

NUMS = [3, 5, 2]  # target 16 = (3 + 5) * 2


def grade(text, target=16, numbers=NUMS, **kw):
    return countdown_reward([text], target=[target], numbers=[numbers], **kw)[0]


@pytest.mark.parametrize("text", [
    "<answer>(3 + 5) * 2</answer>",
    "<think>try 3*5+2=17, no</think><answer> 2*(5+3) </answer>",
    "<think>x</think>\n<answer>(3+5)*2</answer>",
    "</think><answer>(5 + 3) * 2</answer>",  # R1-style: <think> was in the prompt
    "<answer>(3 + 5) * 2</answer>   trailing text</s>",
    "<answer>((3 + 5)) * 2</answer>",
])
def test_correct(text):
    assert grade(text) == 1.0


def test_unary_minus_and_fractions():
    assert grade("<answer>-(3 - 5) * 8</answer>", target=16, numbers=[3, 5, 8]) == 1.0
    assert grade("<answer>8 / (3 - 8 / 3)</answer>", target=24, numbers=[8, 3, 8, 3]) == 1.0  # exact 24
    assert grade("<answer>1 / 3 * 3</answer>", target=1, numbers=[1, 3, 3]) == 1.0  # no float rounding
    assert grade("<answer>4 / 0 * 1</answer>", target=1, numbers=[4, 0, 1]) == 0.0  # division by zero


@pytest.mark.parametrize("text,target,numbers", [
    ("<answer>3.5*2</answer>", 7, [3, 5, 2]),                 # decimal: usual grader reads 3, 5, 2
    ("<answer>3*5.0+2-1</answer>", 16, [3, 5, 2]),
    ("<answer>2**5 - 3 - 5 - 8</answer>", 16, [2, 5, 3]),     # power
    ("<answer>9**9**9**9</answer>", 1, [9, 9, 9, 9]),         # would hang eval
    ("<answer>(3+5)//2*4</answer>", 16, [3, 5, 2]),           # floor division
    ("<answer>(3+5)%2</answer>", 0, [3, 5, 2]),               # modulo
    ("<answer>abs(-16)</answer>", 16, []),                     # call
    ("<answer>x</answer>", 16, []),                            # name
    ("<answer>__import__('os').system('touch /tmp/pwned_rlmem')</answer>", 16, []),
    ("<answer>(lambda: 16)()</answer>", 16, []),
    ("<answer>[16][0]</answer>", 16, [16, 0]),
    ("<answer>16 if 1 else 0</answer>", 16, [16, 1, 0]),
    ("<answer>+3*5+2-1</answer>", 16, [3, 5, 2, 1]),          # unary plus is not allowed
    ("<answer>0x10</answer>", 16, [16]),                       # hex literal
    ("<answer>1_6</answer>", 16, [16]),                        # underscore literal
    ("<answer>3 * 5 + 1</answer>", 16, [3, 5, 2]),            # missing number, extra literal
    ("<answer>3 * 5 + 2 - 1</answer>", 16, [3, 5, 2]),        # extra number
    ("<answer>(3 + 5) * 2 * 1</answer>", 16, [3, 5, 2]),
    ("<answer>(5 + 5) + 6</answer>", 16, [5, 6, 7]),           # duplicate use
    ("<answer>(3 + 5) * 2 = 16</answer>", 16, [3, 5, 2]),      # '=' not allowed
    ("<answer>16</answer>", 16, [3, 5, 2]),                    # just the target
    ("<answer>(3 + 5) * 2</answer>", 17, [3, 5, 2]),          # wrong value
    ("<answer>（3 + 5）* 2</answer>", 16, [3, 5, 2]),          # full-width parentheses
    ("<answer>(３ + 5) * 2</answer>", 16, [3, 5, 2]),          # full-width digit
    ("<answer>(3 + 5) × 2</answer>", 16, [3, 5, 2]),          # unicode operator
    ("<answer>(8 − 3) + 2</answer>", 7, [8, 3, 2]),           # unicode minus
    ("<answer>٣+٥*2</answer>", 13, [3, 5, 2]),                 # Arabic-Indic digits
    ("", 16, [3, 5, 2]),
    ("<answer></answer>", 16, [3, 5, 2]),
    ("<answer>   </answer>", 16, [3, 5, 2]),
    ("(3 + 5) * 2", 16, [3, 5, 2]),                            # no tag
    ("<answer>(3 + 5) * 2", 16, [3, 5, 2]),                    # unclosed tag
    ("<think><answer>(3 + 5) * 2</answer></think>", 16, [3, 5, 2]),          # only inside think
    ("<think>so <answer>(3 + 5) * 2</answer>", 16, [3, 5, 2]),              # think never closed
    ("<answer>(3 + 5) * 2</answer></think>I give up", 16, [3, 5, 2]),       # before </think>
    ("<answer>(3 + 5) * 2</answer><answer>3 + 5 + 2</answer>", 16, [3, 5, 2]),  # last tag wins
    ("<answer>" + "(" * 300 + "3+5" + ")" * 300 + "*2</answer>", 16, [3, 5, 2]),  # deep nesting
    ("<answer>" + "+".join(["1"] * 5000) + "</answer>", 5000, [1] * 5000),        # over the length cap
    ("<answer>" + "9" * 100000 + "</answer>", 1, [1]),                               # huge literal
    ("<answer>\x00(3 + 5) * 2</answer>", 16, [3, 5, 2]),
])
def test_adversarial_zero(text, target, numbers, tmp_path):
    assert grade(text, target, numbers) == 0.0


def test_several_answers_last_one_counts():
    assert grade("<answer>3 + 5 + 2</answer> no wait <answer>(3 + 5) * 2</answer>") == 1.0


def test_nothing_is_executed(monkeypatch):
    called = []
    for name in ("eval", "exec", "compile", "__import__"):
        orig = getattr(builtins, name)

        def spy(*a, _orig=orig, _name=name, **k):
            if _name == "compile" and len(a) >= 3 and a[2] == "exec":
                called.append(_name)
            elif _name in ("eval", "exec"):
                called.append(_name)
            return _orig(*a, **k)
        monkeypatch.setattr(builtins, name, spy)
    grade("<answer>__import__('os').system('echo hi')</answer>")
    grade("<answer>(3 + 5) * 2</answer>")
    assert called == []


def test_format_score_and_garbage_types():
    assert grade("<answer>3.5*2</answer>", format_score=0.1) == 0.1
    assert grade("no answer", format_score=0.1) == 0.0
    assert grade("<answer>(3 + 5) * 2</answer>", format_score=0.1) == 1.0
    # garbage in any argument never raises
    out = countdown_reward([None, 42, {"x": 1}, ["a"], "<answer>1+1</answer>"],
                           target=[None, "abc", 3.5, [1], float("nan")], numbers=[None, "x", [1.5], 7, []])
    assert out == [0.0] * 5


def test_chat_messages_and_trl_kwargs():
    comps = [[{"role": "assistant", "content": "</think><answer>(3 + 5) * 2</answer>"}],
             [{"role": "assistant", "content": [{"type": "text", "text": "<answer>(3 + 5) * 2</answer>"}]}],
             [{"role": "assistant", "content": "<answer>3 * 5 + 2</answer>"}]]
    out = countdown_reward(comps, target=[16, 16, 16], numbers=[NUMS] * 3, prompts=["p"] * 3,
                           completion_ids=[[1]] * 3, trainer_state=None, nums=[[9]] * 3)
    assert out == [1.0, 1.0, 0.0]
    # the hub column name `nums` is accepted when `numbers` is absent
    assert countdown_reward(["<answer>(3 + 5) * 2</answer>"], target=[16], nums=[NUMS]) == [1.0]


def test_huge_expressions_bounded_time():
    texts = ["<answer>" + "(" * 100 + "3" + ")" * 100 + "</answer>" * 1000,
             "<answer>" * 100000 + "x",
             "</think>" * 50000 + "<answer>(3 + 5) * 2</answer>",
             "<answer>" + "1/" * 120 + "1</answer>"]
    t = time.perf_counter()
    out = countdown_reward(texts, target=[16] * 4, numbers=[NUMS] * 4)
    assert time.perf_counter() - t < 2.0
    assert out == [0.0, 0.0, 1.0, 0.0]


def test_evaluate_equation_direct():
    assert evaluate_equation("(3 + 5) * 2", [2, 3, 5]) == 16
    with pytest.raises(InvalidExpression):
        evaluate_equation("2**3")
    with pytest.raises(InvalidExpression):
        evaluate_equation("2 + 3", [2, 2])
    assert score_countdown("<answer>1+1</answer>", "2", "[1, 1]") == 1.0  # string columns tolerated


def test_registry():
    assert get_reward("countdown") is countdown_reward
    assert get_reward("math") is rewards.math_reward
    assert {"countdown", "math"} <= set(rewards.list_rewards())
    with pytest.raises(KeyError, match="countdown"):
        get_reward("nope")

    @rewards.register_reward("test_len_reward")
    def len_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert get_reward("test_len_reward")(["ab"]) == [2.0]
    with pytest.raises(ValueError):
        rewards.register_reward("test_len_reward")(lambda completions, **k: [])
    assert get_reward("rewards.countdown:countdown_reward") is countdown_reward


def test_thread_safe():
    results = []

    def work():
        results.append(countdown_reward(["<answer>(3 + 5) * 2</answer>"] * 50, target=[16] * 50, numbers=[NUMS] * 50))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == [1.0] * 50 for r in results) and len(results) == 4

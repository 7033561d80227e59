"""The toy Countdown task: traces the verifier accepts, disjoint splits, the word-level tokenizer
through the real save/load path, and the data source in the pipeline."""

from __future__ import annotations

import random

import pytest

from rewards.countdown import score_countdown
from rlmem.data import load_examples
from rlmem.data.countdown import solve
from rlmem.data.templates import build_prompt
from rlmem.data.toy import all_problems, search_trace, solutions, split_of, toy_problems


def test_traces_end_in_a_correct_answer_and_search_in_random_order():
    rng = random.Random(0)
    problems = toy_problems("test", 40, seed=3)
    lengths = []
    for p in problems:
        trace = search_trace(p["numbers"], p["target"], rng)
        assert score_countdown(trace, p["target"], p["numbers"]) == 1.0, trace
        lengths.append(len(trace.split()))
    assert sum(lengths) / len(lengths) > 64          # several times the toy steady-state cache (32)
    p = problems[0]
    assert len({search_trace(p["numbers"], p["target"], random.Random(s)) for s in range(8)}) > 1
    # "3 5 7 : 22" -> (3 * 5) + 7 and 22 = 3 * 5 + 7; a branch that cannot reach the target is absent
    assert "( 3 * 5 ) + 7" in solutions([3, 5, 7], 22) and solutions([1, 1, 1], 99) == []


def test_splits_are_disjoint_and_solvable():
    train, test = all_problems("train"), all_problems("test")
    assert len(test) == 188 and len(train) == 1723 and not set(train) & set(test)
    assert all(split_of(list(n), t) == "test" and solve(n, t) is not None for n, t in test)
    a, b = toy_problems("test", 20, seed=1), toy_problems("test", 20, seed=2)
    assert a == toy_problems("test", 20, seed=1) and a != b
    with pytest.raises(ValueError, match="has 188 problems"):
        toy_problems("test", 189)


def test_tokenizer_round_trip_and_pipeline(tmp_path):
    from transformers import AutoTokenizer

    from rlmem.toy.tokenizer import build_toy_tokenizer

    build_toy_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ex = load_examples("countdown-toy", "test", seed=0, limit=2)[0]
    assert ex["task"] == "countdown-toy" and ex["reward"] == "countdown"
    prompt = build_prompt(ex, tok, eviction_rate=0.5)
    ids = tok.encode(prompt, add_special_tokens=False)
    assert len(ids) <= 16 and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["<eviction_rate>", "50", "%", "</eviction_rate>"]
    trace = search_trace(ex["numbers"], ex["target"], random.Random(0))
    c_ids = tok.encode(trace, add_special_tokens=False) + [tok.eos_token_id]
    assert tok.unk_token_id not in c_ids
    assert score_countdown(tok.decode(c_ids, skip_special_tokens=False), ex["target"], ex["numbers"]) == 1.0


def test_training_curves_figure(tmp_path, saved_figures):
    """Four panels; reward and accuracy drawn raw and as a trailing mean over 3 steps in the run's
    colour; a run appears only in the panels it has values for; the PNG is the figure's size."""
    from matplotlib.image import imread

    from rlmem.figures import plot_training_curves

    rows = [{"step": s, "reward/mean": 0.1 * s, "accuracy/mean": 0.3 * s, "eviction/eps": 0.25 * s,
             "eviction/peak_kv_mean": 100 - s} for s in range(1, 5)]
    out = plot_training_curves({"ngc": rows, "full cache": [{"step": 2, "reward/mean": 0.2}]}, tmp_path / "c.png")
    [(fig, path)] = saved_figures
    assert path == out == tmp_path / "c.png"
    assert [ax.get_title() for ax in fig.axes] == ["reward", "verifier accuracy", "eviction rate ε (mean over groups)",
                                                   "peak KV (tokens, mean over rollouts)"]

    def lines(ax):
        return [(None if l.get_label().startswith("_") else l.get_label(), l.get_xdata().tolist(),
                 [round(y, 9) for y in l.get_ydata()]) for l in ax.lines]

    reward, accuracy, eps, peak = fig.axes
    assert lines(reward) == [(None, [1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]),          # raw, faint, no legend entry
                             ("ngc", [1, 2, 3, 4], [0.1, 0.15, 0.2, 0.3]),       # trailing mean of 3
                             (None, [2], [0.2]), ("full cache", [2], [0.2])]
    assert reward.lines[0].get_color() == reward.lines[1].get_color() != reward.lines[3].get_color()
    assert reward.lines[0].get_alpha() == 0.35 and reward.lines[1].get_alpha() is None
    assert lines(accuracy)[1] == ("ngc", [1, 2, 3, 4], [0.3, 0.45, 0.6, 0.9]) and len(accuracy.lines) == 2
    assert lines(eps) == [("ngc", [1, 2, 3, 4], [0.25, 0.5, 0.75, 1.0])]
    assert lines(peak) == [("ngc", [1, 2, 3, 4], [99, 98, 97, 96])]
    assert [t.get_text() for t in reward.get_legend().get_texts()] == ["ngc", "full cache"]
    w, h = fig.get_size_inches() * 100
    assert imread(out).shape[:2] == (round(h), round(w))


def test_shipped_model_loads_with_its_own_tokenizer():
    """A qwen2-typed checkpoint would get Qwen2's digit-splitting pre-tokenizer from AutoTokenizer;
    the shipped warm start is llama-typed so that numbers stay one token each, as in training."""
    from pathlib import Path

    from rlmem.models.loading import load_model_and_tokenizer
    from rlmem.toy.tokenizer import build_toy_tokenizer

    model, tok = load_model_and_tokenizer(Path(__file__).resolve().parents[1] / "models" / "countdown-toy")
    text = "<|user|>8 5 7 : 96<|assistant|><think>\n<eviction_rate>50%</eviction_rate>"
    assert tok.encode(text, add_special_tokens=False) == build_toy_tokenizer().encode(text, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(tok.encode("96 = 13", add_special_tokens=False)) == ["96", "=", "13"]
    assert model.config.head_dim == 64 and model.config.num_hidden_layers == 4


def test_warm_start_training_is_seeded_and_weights_the_stop_decision(tmp_path):
    """The shipped warm start must be reproducible from its command; --stop-weight changes the
    update (the stop-or-continue label after each leaf counts more), nothing else does."""
    import json

    import torch
    from safetensors.torch import load_file

    from rlmem.toy.tokenizer import build_toy_tokenizer

    script = _load_script("train_toy_reasoner")
    stop_decision_ids, train = script.stop_decision_ids, script.train
    tok = build_toy_tokenizer()
    assert tok.convert_ids_to_tokens(stop_decision_ids(tok)) == ["<", ">", "="]
    kw = dict(steps=3, seed=0, batch_size=4, warmup=1, layers=1, hidden=32, heads=2, kv_heads=1, log_every=1)
    a = load_file(train(str(tmp_path / "a"), **kw) / "model.safetensors")
    b = load_file(train(str(tmp_path / "b"), **kw) / "model.safetensors")
    c = load_file(train(str(tmp_path / "c"), **kw, stop_weight=5.0) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    meta = json.loads((tmp_path / "c" / "warmstart.json").read_text())
    assert meta["stop_weight"] == 5.0 and meta["steps"] == 3


def _load_script(name: str):
    """A module of scripts/ (not a package: the toy trainer lives with its command)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Data layer: generator, solver, dataset fixtures in the hubs' real schemas, templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewards import countdown_reward, get_reward
from rlmem.data import build_prompt, find_leaks, generate_countdown, load_examples, solve
from rlmem.data.datasets import DatasetError
from rlmem.data.templates import format_percent, interoception_tag

FIX = Path(__file__).parent / "fixtures" / "datasets"


def test_solver():
    assert solve([3, 5, 2], 16) is not None
    assert solve([1, 1, 1], 97) is None
    e = solve([8, 3, 8, 3], 24)  # needs fractions: 8 / (3 - 8/3)
    assert countdown_reward([f"<answer>{e}</answer>"], target=[24], numbers=[[8, 3, 8, 3]]) == [1.0]


def test_generator_solvable_seeded_ranges():
    a = generate_countdown(100, seed=3)
    assert a == generate_countdown(100, seed=3)
    assert a != generate_countdown(100, seed=4)
    for e in a:
        assert 3 <= len(e["numbers"]) <= 4 and all(1 <= x <= 99 for x in e["numbers"])
        assert 10 <= e["target"] <= 100
    r = countdown_reward([f"<answer>{e['solution']}</answer>" for e in a],
                         target=[e["target"] for e in a], numbers=[e["numbers"] for e in a])
    assert r == [1.0] * 100
    b = generate_countdown(20, seed=0, num_numbers=(2, 2), number_range=(1, 9), target_range=(50, 60))
    assert all(len(e["numbers"]) == 2 and 50 <= e["target"] <= 60 for e in b)


def test_countdown_generated_source():
    tr = load_examples("countdown-generated", "train", num_examples=30, seed=1)
    te = load_examples("countdown-generated", "test", num_examples=30, seed=1)
    assert len(tr) == 30 and not find_leaks(tr, te)
    for e in tr:
        assert e["reward"] == "countdown" and {"id", "prompt", "target", "numbers"} <= set(e)


def test_countdown_hub_schema_split_and_leak(caplog):
    path = str(FIX / "countdown_tasks_3to4.parquet")
    train = load_examples("Jiayi-Pan/Countdown-Tasks-3to4", "train", path=path, train_size=6, test_size=3)
    test = load_examples("Jiayi-Pan/Countdown-Tasks-3to4", "test", path=path, train_size=6, test_size=3)
    assert len(train) == 6
    # row 7 ({64, [96, 63, 95]}) is a reordered duplicate of train row 1 and is dropped
    assert [e["target"] for e in test] == [22, 30]
    kept = load_examples(path, "test", dataset="countdown", train_size=6, test_size=3, drop_leaks=False)
    assert len(kept) == 3
    assert train[0]["numbers"] == [44, 19, 35] and train[0]["target"] == 98
    assert "[44, 19, 35]" in train[0]["prompt"] and "98" in train[0]["prompt"]


def test_dapo_schema_dedup():
    ex = load_examples("BytedTsinghua-SIA/DAPO-Math-17k", path=str(FIX / "dapo_math_17k.parquet"))
    assert len(ex) == 3  # 5 rows, 3 distinct problems
    assert [e["answer"] for e in ex] == ["34", "9", "12"]
    assert all(e["reward"] == "math" for e in ex)
    assert not ex[0]["prompt"].startswith("Solve the following") and "Remember to put" not in ex[0]["prompt"]
    assert ex[0]["prompt"].startswith("In triangle")
    # schema recognised from the columns without a hint
    assert len(load_examples(str(FIX / "dapo_math_17k.parquet"))) == 3


@pytest.mark.parametrize("dsid,file,n,answers", [
    ("math-ai/amc23", "amc23.parquet", 3, ["10", "9", "2.5"]),
    ("HuggingFaceH4/aime_2024", "aime_2024.jsonl", 2, ["24", "1001"]),
    ("MathArena/aime_2025", "aime_2025.parquet", 2, ["70", "42"]),
])
def test_eval_sets(dsid, file, n, answers):
    ex = load_examples(dsid, "test", path=str(FIX / file))
    assert len(ex) == n and [e["answer"] for e in ex] == answers
    assert all(e["prompt"] and e["reward"] == "math" and e["id"] for e in ex)
    assert len({e["id"] for e in ex}) == n
    # the answers grade correctly with the math reward
    r = get_reward("math")([f"</think>\\boxed{{{a}}}" for a in answers], answer=[e["answer"] for e in ex])
    assert r == [1.0] * n


def test_local_mapping_limit_and_errors(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"q": f"What is {i}+{i}?", "sol": 2 * i}) for i in range(5)) + "\n")
    ex = load_examples(str(p), mapping={"prompt": "q", "answer": "sol"}, limit=3)
    assert [e["answer"] for e in ex] == ["0", "2", "4"] and ex[1]["prompt"] == "What is 1+1?"
    shuffled = load_examples(str(p), mapping={"prompt": "q", "answer": "sol"}, shuffle=True, seed=1)
    assert sorted(e["answer"] for e in shuffled) == ["0", "2", "4", "6", "8"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2"):
        load_examples(str(bad))
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"target": 5, "nums": "oops"}\n')
    with pytest.raises(DatasetError, match="nums"):
        load_examples(str(missing))
    with pytest.raises(KeyError, match="Countdown-Tasks"):
        load_examples("no/such-dataset")
    with pytest.raises(DatasetError, match="nope.parquet: dataset file not found"):
        load_examples("Jiayi-Pan/Countdown-Tasks-3to4", path=str(tmp_path / "nope.parquet"))


def test_hub_offline_error_is_clear():
    with pytest.raises(RuntimeError, match="path="):
        load_examples("math-ai/amc23", "test")


def test_templates(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cd = {"id": "x", "prompt": "Using the numbers [3, 5, 2], create an equation that equals 16.",
          "reward": "countdown", "target": 16, "numbers": [3, 5, 2]}
    text = build_prompt(cd, tok)
    assert text.endswith("<think>\n") and "<answer>" in text and "[3, 5, 2]" in text
    assert text == tok.apply_chat_template([{"role": "user", "content": text.split("<|user|>")[1].split("<|assistant|>")[0]}],
                                           tokenize=False, add_generation_prompt=True)
    tagged = build_prompt(cd, tok, eviction_rate=0.5)
    assert tagged == text + "<eviction_rate>50%</eviction_rate>"
    assert interoception_tag(0.375) == "<eviction_rate>37.5%</eviction_rate>"
    assert interoception_tag(0.1) == "<eviction_rate>10%</eviction_rate>"
    in_user = build_prompt(cd, tok, eviction_rate=0.25, tag_position="user")
    assert "<eviction_rate>25%</eviction_rate><|assistant|>" in in_user and in_user.endswith("<think>\n")
    ids = tok(tagged, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<eviction_rate>") in ids  # the tag is a single special token
    m = build_prompt({"prompt": "What is 1+1?", "reward": "math", "answer": "2"}, tok, template="plain")
    assert "\\boxed{}" in m and "<|user|>" not in m and m.endswith("<think>\n")
    assert format_percent(0.125) == "12.5%" and format_percent(1) == "100%" and format_percent(0.1) == "10%"
    for bad in (0, 1.5, -0.1, "x"):
        with pytest.raises(ValueError):
            build_prompt(cd, tok, eviction_rate=bad)
    with pytest.raises(ValueError):
        build_prompt(cd, None, template="chat")


def test_a_registered_dataset_is_loaded_through_the_registry(tmp_path, monkeypatch):
    """load_examples has no per-source branches: registering a spec is how a source is added."""
    import rlmem.data.datasets as ds

    monkeypatch.setattr(ds, "DATASETS", dict(ds.DATASETS))
    calls = []

    def squares(split, *, limit, seed, **options):
        calls.append((split, limit, seed, options))
        return [{"id": f"sq-{i}", "prompt": f"{i}*{i}?", "reward": "math", "task": "math", "answer": str(i * i)}
                for i in range(options.get("num_examples", 5))]

    ds.register_dataset(ds.DatasetSpec("squares", generate=squares, aliases=("sq",)))
    out = load_examples("sq", "test", limit=3, seed=7, num_examples=4)
    assert [e["answer"] for e in out] == ["0", "1", "4"] and calls == [("test", 3, 7, {"num_examples": 4})]
    with pytest.raises(KeyError, match="'squares'"):          # the unknown-source message lists it
        load_examples("cubes")
    with pytest.raises(ValueError, match="'sq' is already registered"):
        ds.register_dataset(ds.DatasetSpec("other", generate=squares, aliases=("sq",)))
    # a hub-style dataset (rows + converter) reads its local copy through the same spec
    ds.register_dataset(ds.DatasetSpec("me/qa", ds.math_row, "train", "math", aliases=("qa",), splits=("train",)))
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"question": "1+1?", "answer": 2}) + "\n")
    assert load_examples("qa", path=str(p))[0]["answer"] == "2"
    assert load_examples(str(p), dataset="qa")[0]["prompt"] == "1+1?"
    with pytest.raises(ValueError, match="me/qa has no 'test' split"):
        load_examples("qa", "test", path=str(p))
    assert "countdown-generated" in ds.dataset_names() and "passkey-write" in ds.dataset_names()

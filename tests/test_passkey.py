"""Generated pass-key tasks and their verifier."""

from __future__ import annotations

import pytest

from rewards import get_reward, passkey_reward
from rewards.passkey import last_number
from rlmem.data import build_prompt, load_examples
from rlmem.data.passkey import FILLER, generate_passkey, key_sentence


def test_generator_seeded_key_in_prompt_at_random_depths():
    a = generate_passkey(50, seed=1)
    assert a == generate_passkey(50, seed=1)
    assert [e["answer"] for e in a] != [e["answer"] for e in generate_passkey(50, seed=2)]
    depths = set()
    for e in a:
        key = e["answer"]
        assert len(key) == 5 and key.isdigit()
        assert e["prompt"].count(key) == 2 and key_sentence(key).strip() in e["prompt"]
        assert e["prompt"].count(FILLER.strip()) == 14
        assert e["prompt"].rstrip().endswith("What is the pass key?")
        assert e["reward"] == "passkey" and e["task"] == "passkey"
        depths.add(round(e["depth"], 3))
    assert min(depths) < 0.25 and max(depths) > 0.75     # anywhere in the filler


def test_write_variant_asks_for_a_list_first():
    e = generate_passkey(3, seed=0, write_items=12, variant="passkey-write")[0]
    assert "numbered list of 12" in e["prompt"] and e["id"] == "passkey-write-0"
    assert e["prompt"].index("numbered list") < e["prompt"].index("What is the pass key?")


def test_registered_sources_and_splits_are_disjoint():
    train = load_examples("passkey", "train", limit=20, seed=0)
    test = load_examples("passkey", "test", limit=20, seed=0)
    assert len(test) == 20 and {e["answer"] for e in train} != {e["answer"] for e in test}
    w = load_examples("passkey-write", "test", limit=4)
    assert all("numbered list" in e["prompt"] for e in w)
    with pytest.raises(ValueError, match="num_examples"):
        generate_passkey(0)


def test_prompt_has_no_extra_instruction():
    e = generate_passkey(1, seed=0)[0]
    assert build_prompt(e, None, template="plain") == f"User: {e['prompt']}\nAssistant: <think>\n"


def test_verifier_exact_last_number():
    assert get_reward("passkey") is passkey_reward
    cases = [("The pass key is 12345.", 1.0), ("12345", 1.0), ("The pass key is 12345. Done!", 1.0),
             ("1. apple\n2. pear\nThe pass key is 12345.", 1.0),
             ("The pass key is 12345, or maybe 67890.", 0.0), ("The pass key is 1234.", 0.0),
             ("The pass key is 123456.", 0.0), ("no number", 0.0), ("", 0.0), (None, 0.0),
             ("<think>12345", 0.0), ("<think>hmm</think>The pass key is 12345", 1.0),
             ([{"role": "assistant", "content": "It is 12345."}], 1.0)]
    got = passkey_reward([c for c, _ in cases], answer=["12345"] * len(cases))
    assert got == [v for _, v in cases]
    assert last_number("a 1 b 22 c 333x") == "333" and last_number("none") is None
    assert passkey_reward(["12345"]) == [0.0]   # no gold: never correct

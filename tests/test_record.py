"""The rollout record: validation names the field, JSONL errors name the file and line."""

import json

import pytest

from rlmem.eviction.record import RecordError, RolloutRecord, evicted_at, read_jsonl

EV = {"delta": 8, "eps": 0.5, "block_size": 4, "window": 4, "protect_recent": 1, "score_transform": "log", "tau": 1.0}


def good() -> dict:
    # prompt 5 tokens, completion 5 -> n = 10, one round at t = 8 with 8 alive keys = 2 blocks, keep 1 + protected
    return {"prompt_ids": [1, 2, 3, 4, 5], "completion_ids": [6, 7, 8, 9, 10], "logprobs": [-1.0] * 5,
            "temperature": 0.9, "reward": 1.0,
            "eviction": dict(EV, rounds=[{"t": 8, "layers": [{"num_blocks": 2, "kept": [], "logprob": 0.0}] * 2}])}


def test_good_record_parses_and_derives_evicted_at():
    rec = RolloutRecord.from_dict(good())
    ea = evicted_at(rec)
    # N=2, keep round_half_up(1.0)=1 block = the protected newest one: keys 0-3 go at t=8 in both layers
    assert ea.shape == (2, 10)
    assert ea[:, :4].eq(8).all() and ea[:, 4:].gt(10**9).all()


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("logprobs"), "logprobs"),
    (lambda d: d.update(logprobs=[-1.0] * 4), "logprobs"),
    (lambda d: d.update(logprobs=[-1.0, -1.0, 0.5, -1.0, -1.0]), "logprobs"),
    (lambda d: d.update(prompt_ids=[1, "a"]), "prompt_ids"),
    (lambda d: d.update(temperature=0), "temperature"),
    (lambda d: d["eviction"].update(eps=2.0), "eps"),
    (lambda d: d["eviction"].update(window=16), "window"),
    (lambda d: d["eviction"]["rounds"][0].update(t=7), "rounds[0].t"),
    (lambda d: d["eviction"].update(rounds=[]), "rounds"),
    (lambda d: d["eviction"]["rounds"][0].update(layers=[{"num_blocks": 2, "kept": [0], "logprob": 0.0}] * 2), "kept"),
    (lambda d: d["eviction"]["rounds"][0].update(layers=[{"num_blocks": 2, "kept": []}]), "logprob"),
])
def test_malformed_record_names_the_field(mutate, field):
    d = good()
    mutate(d)
    with pytest.raises(RecordError, match=__import__("re").escape(field)):
        RolloutRecord.from_dict(d)


def test_block_count_mismatch_is_caught_when_deriving_evicted_at():
    d = good()
    d["eviction"]["rounds"][0]["layers"] = [{"num_blocks": 3, "kept": [0], "logprob": -0.5}] * 2
    rec = RolloutRecord.from_dict(d)
    with pytest.raises(RecordError, match="num_blocks"):
        evicted_at(rec)


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(good()) + "\n" + "{not json\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2"):
        read_jsonl(p)
    bad = good()
    del bad["temperature"]
    p.write_text(json.dumps(good()) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:3.*temperature"):
        read_jsonl(p)

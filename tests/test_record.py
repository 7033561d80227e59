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


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n{"b": \xff\xfe}\n', r"x\.jsonl:2: not UTF-8 text \(byte 0xff at column 7\)"),
    (b'{"a": 1}\n\n[1, 2]\n', r"x\.jsonl:3: expected a JSON object, got an array: \[1, 2\]"),
    (b'{"a": 1}\n"text"\n', r"x\.jsonl:2: expected a JSON object, got a string"),
    (b'{"a": 1}\n{"a": 2\n', r"x\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 8\)"),
])
def test_the_one_jsonl_reader_names_file_and_line(tmp_path, content, message):
    """rlmem.jsonl is every JSONL read: bad JSON, non-UTF-8 bytes and non-objects name file:line."""
    from rlmem.jsonl import read_json_lines

    p = tmp_path / "x.jsonl"
    p.write_bytes(content)
    with pytest.raises(RecordError, match=message):
        read_json_lines(p, RecordError)
    (tmp_path / "r.jsonl").write_bytes(content.replace(b'{"a": 1}', json.dumps(good()).encode()))
    with pytest.raises(RecordError, match=message.replace("x\\.jsonl", "r\\.jsonl")):   # the records reader
        read_jsonl(tmp_path / "r.jsonl")


def test_jsonl_reader_torn_tail_empty_files_and_bom(tmp_path):
    from rlmem.jsonl import read_json_lines

    p = tmp_path / "log.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"step": 1}\r\n{"step": 2}\n{"st')        # BOM, CRLF, a crash mid-append
    assert [o for _, o in read_json_lines(p, torn="tail")] == [{"step": 1}, {"step": 2}]
    with pytest.raises(ValueError, match=r"log\.jsonl:3: not valid JSON"):
        read_json_lines(p)
    p.write_bytes(b'{"step": 1}\n{"st\n{"step": 3}\n')                    # torn in the middle: only "skip" skips it
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not valid JSON"):
        read_json_lines(p, torn="tail")
    assert [o["step"] for _, o in read_json_lines(p, torn="skip")] == [1, 3]
    p.write_bytes(b"\n  \n")
    assert read_json_lines(p) == []
    with pytest.raises(RecordError, match=r"log\.jsonl: no records in file"):
        read_json_lines(p, RecordError, empty="records")
    with pytest.raises(RecordError, match=r"nope\.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    assert [w for w, _ in read_json_lines(tmp_path / "log.jsonl")] == []
    (tmp_path / "ok.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [w for w, _ in read_json_lines(tmp_path / "ok.jsonl")] == [f"{tmp_path}/ok.jsonl:1", f"{tmp_path}/ok.jsonl:3"]

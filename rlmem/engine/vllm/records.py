"""Rollout records from vLLM's outputs and the worker's own eviction decisions (docs/design.md section 2)."""

from __future__ import annotations

from rlmem.eviction.policy import EvictionConfig, round_times
from rlmem.eviction.record import EvictionRound, EvictionTrace, LayerEviction, RolloutRecord
from rlmem.metrics import peak_kv_entries


def finish_reason(completion) -> str:
    """``eos`` / ``stop`` / ``length`` like the torch engine (vLLM says ``stop`` for EOS and stop strings)."""
    if completion.finish_reason == "length":
        return "length"
    if isinstance(completion.stop_reason, str):
        return "stop"
    return "eos" if completion.finish_reason == "stop" else str(completion.finish_reason)


def token_logprobs(completion) -> list[float]:
    """The sampled tokens' log-probs (the worker wrote the untruncated ``log_softmax(logits/T)``)."""
    if completion.logprobs is None or len(completion.logprobs) != len(completion.token_ids):
        raise RuntimeError("vLLM returned no per-token log-probs (the request must ask for logprobs=0)")
    return [float(d[t].logprob) for t, d in zip(completion.token_ids, completion.logprobs)]


def assemble(prompt_ids: list[int], completion, temperature: float, cfg: EvictionConfig | None,
             decisions: dict | None) -> RolloutRecord:
    """One record; rounds after the last fed token (an engine may run a step past a stop string) are dropped."""
    completion_ids = list(completion.token_ids)
    seq_len = len(prompt_ids) + len(completion_ids)
    written = seq_len - 1                        # the last sampled token is never fed
    trace, sizes = None, []
    preempted = bool(decisions and decisions.get("preempted"))
    if cfg is not None and cfg.enabled:
        due = set(round_times(len(prompt_ids), seq_len, cfg))
        rounds_raw = [r for r in (decisions or {}).get("rounds", []) if r[0] in due]
        if len(rounds_raw) != len(due):
            raise RuntimeError(f"vLLM engine: {len(rounds_raw)} rounds recorded for a {seq_len}-token sequence "
                               f"whose schedule has {len(due)}")
        rounds = []
        for t, n_alive, new_len, layers in rounds_raw:
            sizes.append((t, n_alive, new_len))
            rounds.append(EvictionRound(t, [LayerEviction(nb, list(kept), lp) for nb, kept, lp in layers]))
        trace = EvictionTrace(cfg, rounds)
    extra = {"peak_kv": peak_kv_entries(written, sizes), "finish_reason": finish_reason(completion), "engine": "vllm"}
    if preempted:
        extra["preempted"] = True
    return RolloutRecord(prompt_ids=list(prompt_ids), completion_ids=completion_ids,
                         logprobs=token_logprobs(completion), temperature=float(temperature), reward=None,
                         eviction=trace, extra=extra)

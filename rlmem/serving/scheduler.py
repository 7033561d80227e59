"""The scheduler ``rlmem serve`` runs: :class:`~rlmem.engine.vllm.scheduler.NGCScheduler` plus Prometheus metrics.

The scheduler lives in vLLM's engine-core process and ``/metrics`` is served by the API-server
process; the launcher (:mod:`.server`) sets ``PROMETHEUS_MULTIPROC_DIR`` before either imports
``prometheus_client``, so metrics made here are written to that directory and vLLM's ``/metrics``
(which reads it with a ``MultiProcessCollector``, vllm/v1/metrics/prometheus.py) shows them.

Concurrency is counted here too, once per scheduler step: the histogram
``rlmem_step_running_seqs`` observes how many requests the step runs. Its ``_sum``/``_count`` give the
step-weighted mean and its buckets the most, exactly; sampling vLLM's ``vllm:num_requests_running``
gauge from a client instead misses whole phases when the machine is loaded (the reads queue
behind the streams).

A request's peak cache is counted in KV blocks of ``block_size`` tokens (what eviction frees),
after each schedule, and observed once when the request finishes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from rlmem.engine.vllm.internals import adapt
from rlmem.engine.vllm.scheduler import NGCScheduler

PEAK_BUCKETS = tuple(float(2 ** i) for i in range(17))   # 1 .. 65536 blocks
# one bucket per count up to 64 (the exact most for any small server), then doubling to 4096
RUNNING_BUCKETS = tuple(float(i) for i in range(1, 65)) + tuple(float(2 ** i) for i in range(7, 13))

ROUNDS = Counter("rlmem_eviction_rounds", "NGC eviction rounds run (one per request round, all layers)")
FREED = Counter("rlmem_freed_blocks", "KV blocks eviction rounds returned to vLLM's block pool")
IN_USE = Gauge("rlmem_kv_blocks_in_use", "KV blocks in use after the last schedule", multiprocess_mode="mostrecent")
PEAK = Histogram("rlmem_request_peak_kv_blocks", "most KV blocks a finished request held at once "
                 "(blocks of the engine's block size)", buckets=PEAK_BUCKETS)
RUNNING = Histogram("rlmem_step_running_seqs", "requests one scheduler step runs (steps running none are "
                    "not observed)", buckets=RUNNING_BUCKETS)


class ServingScheduler(NGCScheduler):
    """Counts what the NGC scheduler does into the Prometheus metrics above."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rlmem_request_peak: dict[str, int] = {}     # vLLM request id -> most blocks held
        self.rlmem_request_rounds: dict[str, int] = {}   # vLLM request id -> rounds run
        self._reported = (0, 0)                           # (rounds, freed) already counted

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        rounds, freed = self.rlmem_rounds, self.rlmem_freed_blocks
        ROUNDS.inc(rounds - self._reported[0])
        FREED.inc(freed - self._reported[1])
        self._reported = (rounds, freed)
        pool = self.rlmem_vllm.kv_cache_manager.block_pool
        IN_USE.set(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())   # block 0 is vLLM's null block
        if self.rlmem_vllm.running:
            RUNNING.observe(len(self.rlmem_vllm.running))
        for rid in out.rlmem.rounds:
            self.rlmem_request_rounds[rid] = self.rlmem_request_rounds.get(rid, 0) + 1
        for r in self.rlmem_vllm.running:
            rid = adapt("Request", r).request_id
            n = len(self.request_blocks(rid))
            if n > self.rlmem_request_peak.get(rid, 0):
                self.rlmem_request_peak[rid] = n
        return out

    def _free_request(self, request, *args, **kwargs):
        """Also hands the request's figures to its response: with no KV connector configured, vLLM
        puts what this returns first into the response's ``kv_transfer_params`` (non-streamed
        completions and chat completions), so each response carries ``{"rlmem": {"peak_kv_blocks",
        "eviction_rounds"}}``."""
        out = super()._free_request(request, *args, **kwargs)
        rid = adapt("Request", request).request_id
        peak = self.rlmem_request_peak.pop(rid, None)
        rounds = self.rlmem_request_rounds.pop(rid, 0)
        if peak is not None:
            PEAK.observe(peak)
        if isinstance(out, tuple) and len(out) == 2 and out[0] is None and peak is not None:
            out = ({"rlmem": {"peak_kv_blocks": peak, "eviction_rounds": rounds}}, out[1])
        return out

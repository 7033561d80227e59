"""``rlmem serve``: vLLM's OpenAI-compatible API server with NGC eviction inside its engine.

* :mod:`.server`: the launcher (vLLM's own argument parser and server functions, plus the worker
  hooks installed before the first request) and :func:`.server.start`, a handle for tests and
  benchmarks;
* :mod:`.middleware`: refuses a bad ``vllm_xargs`` eviction setting with HTTP 400 and adds the
  interoception tag to the prompt;
* :mod:`.scheduler`: rlmem's counters in vLLM's Prometheus ``/metrics`` (names ``rlmem_*``).

The per-request translation itself is :mod:`rlmem.engine.vllm.served` (the engine reads it too).
"""

"""The vLLM rollout backend (engine ``vllm``): NGC eviction inside vLLM 0.32's paged KV cache.

Modules: :mod:`.version` (the pinned version), :mod:`.internals` (every private vLLM member used,
checked at start), :mod:`.requests` (per-request NGC settings),
:mod:`.compaction` (round index arithmetic), :mod:`.layouts` (KV layout adapters),
:mod:`.scheduler` (``scheduler_cls``: schedule, freed blocks), :mod:`.worker`
(``worker_extension_cls``: scoring, compaction, positions, queries, log-probs), :mod:`.records`,
:mod:`.weights` (bucketed weight updates), :mod:`.engine` (the engine). Importing this package
does not import vLLM.
"""

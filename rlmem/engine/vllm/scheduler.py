"""vLLM scheduler extension (``scheduler_cls``): runs the NGC schedule and returns evicted blocks to the pool.

Before each step, for every running NGC request whose next fed position ``t`` is a round time
(docs/design.md section 1, Schedule), the post-round length is known before any decision (it
depends only on the alive count): the tail of the request's block list is freed to vLLM's block
pool at once and the request's offset (true length minus cache length) grows by the freed slots.
The worker is told through the step's ``SchedulerOutput`` (attribute ``rlmem``) and, before any
forward of that step, moves the kept blocks into the front of the list, so a freed block is
read before anybody can write it.

Block accounting stays vLLM's: the coordinator's per-request block counts are asked for the
*cache* length (true length minus offset), which is what one block table per request holds.
Preemption frees all blocks and recomputes the request with a full cache; it is flagged so
training can drop the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlmem.engine.vllm.compaction import plan_round
from rlmem.engine.vllm.internals import OWNERS, adapt, check_class, check_live, vllm_class
from rlmem.engine.vllm.requests import RequestNGC
from rlmem.engine.vllm.served import ServeDefaults, settings_of
from rlmem.eviction.policy import is_round

Scheduler = vllm_class("Scheduler")


@dataclass
class RoundPlan:
    """What the worker needs to run one round of one request (all layers)."""

    t: int
    n_alive: int
    num_blocks: int
    keep: int


@dataclass
class StepInfo:
    """Attached to each ``SchedulerOutput`` as ``rlmem``."""

    rounds: dict[str, RoundPlan] = field(default_factory=dict)   # vLLM request id -> round due now
    offsets: dict[str, int] = field(default_factory=dict)        # every NGC request with an offset
    preempted: list[str] = field(default_factory=list)           # NGC requests preempted this step


class NGCScheduler(Scheduler):
    """vLLM's scheduler plus NGC rounds; vLLM's own members are read through ``self.rlmem_vllm``
    (:mod:`.internals`), checked here, before the first step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_class(OWNERS["Scheduler"], Scheduler)     # the overridden methods exist in vLLM's class
        check_live("Scheduler", self)
        v = self.rlmem_vllm = adapt("Scheduler", self)
        if v.cache_config.enable_prefix_caching:
            raise ValueError("the rlmem vLLM engine needs enable_prefix_caching=False: compacted blocks "
                             "would keep the hashes of tokens they no longer hold")
        groups = v.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"the rlmem vLLM engine supports models with one KV cache group (got {len(groups)})")
        # rlmem serve's defaults for requests that name their settings in vllm_xargs (None: offline engine)
        self.rlmem_serve = ServeDefaults.from_additional_config(v.vllm_config.additional_config)
        self.rlmem_offsets: dict[str, int] = {}
        self.rlmem_done: dict[str, int] = {}          # last round time run per request
        self.rlmem_preempted: list[str] = []
        self.rlmem_settings: dict[str, RequestNGC | None] = {}
        self.rlmem_freed_blocks = 0                    # total blocks returned to the pool by rounds
        self.rlmem_rounds = 0                          # request rounds started
        self.rlmem_peak_running = 0                    # most requests scheduled in one step
        self.rlmem_peak_used = 0                       # most blocks in use after a schedule
        self.rlmem_trace: list[dict] | None = None     # per-step block counts when a test asks for them
        self._offset_allocation(v.kv_cache_manager.coordinator)

    # ------------------------------------------------------------------ block accounting
    def _offset_allocation(self, coord) -> None:
        """Make the coordinator size each request's block list by its cache length, not its true length.

        ``allocate_slots`` has no per-request length hook; its two length-based calls are keyed by
        request id, so they are wrapped on this scheduler's own coordinator instance.
        """
        offsets = self.rlmem_offsets
        get_n, alloc = coord.get_num_blocks_to_allocate, coord.allocate_new_blocks

        def get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs):
            off = offsets.get(request_id, 0)
            if off and "num_tokens_main_model" in kwargs:
                kwargs["num_tokens_main_model"] -= off
            return get_n(request_id, num_tokens - off, *args, **kwargs)

        def allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
            off = offsets.get(request_id, 0)
            return alloc(request_id, num_tokens - off, num_tokens_main_model - off, *args, **kwargs)

        coord.get_num_blocks_to_allocate = get_num_blocks_to_allocate
        coord.allocate_new_blocks = allocate_new_blocks

    def _settings(self, request) -> RequestNGC | None:
        """``request``: an adapted vLLM ``Request``."""
        rid = request.request_id
        if rid not in self.rlmem_settings:
            self.rlmem_settings[rid] = settings_of(request.sampling_params, self.rlmem_serve)
        return self.rlmem_settings[rid]

    def _running(self) -> list:
        return [adapt("Request", r) for r in self.rlmem_vllm.running]

    def request_blocks(self, request_id: str) -> list:
        managers = self.rlmem_vllm.kv_cache_manager.coordinator.single_type_managers
        return adapt("SingleTypeKVCacheManager", managers[0]).req_to_blocks.get(request_id, [])

    def page_bytes(self) -> int:
        """Bytes of one KV block of one layer (K and V)."""
        group = adapt("KVCacheGroupSpec", self.rlmem_vllm.kv_cache_config.kv_cache_groups[0])
        return int(group.kv_cache_spec.page_size_bytes)

    # ------------------------------------------------------------------ schedule
    def schedule(self, *args, **kwargs):
        pool = self.rlmem_vllm.kv_cache_manager.block_pool
        free_before = pool.get_num_free_blocks()
        rounds = self._step_rounds = self._start_rounds()
        free_after_rounds = pool.get_num_free_blocks()
        out = super().schedule(*args, **kwargs)
        used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()    # block 0 is vLLM's null block
        self.rlmem_peak_used = max(self.rlmem_peak_used, used)
        self.rlmem_peak_running = max(self.rlmem_peak_running,
                                      len(adapt("SchedulerOutput", out).num_scheduled_tokens))
        if self.rlmem_trace is not None:
            running = self._running()
            self.rlmem_trace.append({
                "free_before": free_before, "free_after_rounds": free_after_rounds,
                "freed": {r: p.num_blocks - p.keep for r, p in rounds.items()},
                "blocks": {r.request_id: len(self.request_blocks(r.request_id)) for r in running},
                "computed": {r.request_id: r.num_computed_tokens for r in running},
                "ngc": {r.request_id: self._settings(r) is not None and self._settings(r).config is not None
                        for r in running}})
        self._step_rounds = {}
        preempted = set(self.rlmem_preempted)
        self.rlmem_preempted = []
        out.rlmem = StepInfo(rounds={r: p for r, p in rounds.items() if r not in preempted},
                             offsets={r: o for r, o in self.rlmem_offsets.items() if o},
                             preempted=sorted(preempted))
        return out

    def _start_rounds(self) -> dict[str, RoundPlan]:
        """Free the evicted tail blocks of every request whose round is due before this step."""
        rounds: dict[str, RoundPlan] = {}
        self._done_before: dict[str, int] = {}
        pool = self.rlmem_vllm.kv_cache_manager.block_pool
        for request in self._running():
            s = self._settings(request)
            if s is None or s.config is None:
                continue
            t = request.num_computed_tokens
            rid = request.request_id
            if (request.num_tokens - 1 != t or self.rlmem_done.get(rid, -1) >= t
                    or not is_round(t, request.num_prompt_tokens, s.config)):
                continue
            n_alive = t - self.rlmem_offsets.get(rid, 0)
            plan = plan_round(n_alive, s.config)
            blocks = self.request_blocks(rid)
            if len(blocks) != plan.num_blocks:
                raise RuntimeError(f"rlmem vLLM scheduler: request {rid} holds {len(blocks)} blocks for "
                                   f"{n_alive} cached tokens (expected {plan.num_blocks})")
            tail = blocks[plan.keep:]
            del blocks[plan.keep:]
            pool.free_blocks(reversed(tail))
            self.rlmem_freed_blocks += len(tail)
            self.rlmem_offsets[rid] = t - plan.new_len
            self._done_before[rid] = self.rlmem_done.get(rid, -1)
            self.rlmem_done[rid] = t
            rounds[rid] = RoundPlan(t, n_alive, plan.num_blocks, plan.keep)
            self.rlmem_rounds += 1
        return rounds

    # ------------------------------------------------------------------ request lifecycle
    def _preempt_request(self, request, *args, **kwargs):
        super()._preempt_request(request, *args, **kwargs)
        rid = adapt("Request", request).request_id
        if self.rlmem_settings.get(rid) is not None:
            self.rlmem_offsets.pop(rid, None)   # recomputed from scratch with a full cache
            self.rlmem_preempted.append(rid)
            if rid in getattr(self, "_step_rounds", {}):   # its round started this step never ran: redo it
                self.rlmem_done[rid] = self._done_before[rid]

    def _free_request(self, request, *args, **kwargs):
        out = super()._free_request(request, *args, **kwargs)
        rid = adapt("Request", request).request_id
        self.rlmem_offsets.pop(rid, None)
        self.rlmem_done.pop(rid, None)
        self.rlmem_settings.pop(rid, None)
        return out

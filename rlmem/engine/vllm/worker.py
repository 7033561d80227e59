"""vLLM worker extension (``worker_extension_cls``): NGC rounds, true positions, queries, log-probs.

``rlmem_install`` (called once through ``collective_rpc``) hooks the V1 model runner, which the CPU
runner subclasses (so one set of hooks serves CPU and CUDA with ``VLLM_USE_V2_MODEL_RUNNER=0``):

* before ``_update_states`` (so before the step's new blocks are appended and before any forward):
  run the rounds the scheduler started this step: score every layer with the shared policy
  (:func:`rlmem.eviction.policy.decide` through the scorer registry), move each layer's kept blocks
  to the front of the request's block list, cut the list to the kept count;
* after ``_prepare_inputs``: subtract each request's offset from ``seq_lens`` and from the slot
  mapping (what attention reads and where new K/V go) while ``positions`` (RoPE) stay true;
* around every attention ``impl.forward``: keep the last ``w`` post-RoPE queries per request;
* around the sampler: the record's log-prob of each sampled token under the untruncated
  ``softmax(logits / T)`` (vLLM's processed log-probs include top-k/top-p truncation).

The decisions and flags are collected per request and read back with ``rlmem_take``. Every vLLM
member used here is reached through :func:`.internals.adapt` and checked by ``rlmem_install``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from rlmem.engine.sampling import token_log_softmax
from rlmem.engine.vllm.compaction import Shrink, block_moves, cache_positions
from rlmem.engine.vllm.internals import adapt, check_live, vllm_class
from rlmem.engine.vllm.layouts import KVLayout, check_cache_view, copy_blocks, layout_for
from rlmem.engine.vllm.requests import RequestNGC
from rlmem.engine.vllm.served import ServeDefaults, settings_of
from rlmem.eviction.policy import decide
from rlmem.eviction.scorers import ScoringInputs, get_scorer


@dataclass
class _Req:
    """Worker-side NGC state of one request."""

    settings: RequestNGC
    slot: int                                  # row in the query buffers
    num_layers: int
    last_t: int = 0                            # positions >= last_t are in the cache in order
    kept_positions: list[torch.Tensor | None] = field(default_factory=list)   # per layer, alive before last_t
    rounds: list = field(default_factory=list)  # [(t, n_alive, new_len, [(num_blocks, kept, logprob) per layer])]
    preempted: bool = False

    def alive_positions(self, layer: int, t: int) -> torch.Tensor:
        kept = self.kept_positions[layer]
        new = torch.arange(self.last_t, t)
        return new if kept is None else torch.cat([kept, new])


def _layer_index(name: str) -> int:
    nums = re.findall(r"\.(\d+)\.", name)
    if not nums:
        raise ValueError(f"cannot find a layer index in attention layer name {name!r}")
    return int(nums[0])


class NGCWorkerState:
    """Everything the hooks share; lives in the worker process."""

    def __init__(self, runner, seed: int, serve: ServeDefaults | None = None):
        """``runner``: the adapted vLLM model runner (:func:`.internals.adapt`); ``serve``: rlmem serve's
        defaults (requests then name their settings in ``vllm_xargs``)."""
        attention = vllm_class("Attention")
        self.runner = runner
        ctx = runner.compilation_config.static_forward_context
        attn = sorted(((n, m) for n, m in ctx.items() if isinstance(m, attention)), key=lambda x: _layer_index(x[0]))
        for _, m in attn:
            check_live("Attention", m)
        self.layer_names = [n for n, _ in attn]
        self.layers = [adapt("Attention", m) for _, m in attn]
        self.num_layers = len(self.layers)
        m0 = self.layers[0]
        self.num_heads, self.head_size = m0.impl.num_heads, m0.impl.head_size
        self.block_size = runner.cache_config.block_size
        # backend and physical cache layout as vLLM chose them; each layer's cache view must match
        cache_layout = runner.cache_config.kv_cache_layout
        backend = m0.attn_backend.get_name()
        self.layout: KVLayout = layout_for(backend, m0.isa, cache_layout)
        for name, m in zip(self.layer_names, self.layers):
            if m.attn_backend.get_name() != backend:
                raise ValueError(f"vLLM attention layer {name} uses backend {m.attn_backend.get_name()}, the first "
                                 f"layer {backend}: the rlmem vLLM backend reads one backend for every layer")
            check_cache_view(m.kv_cache, cache_layout, num_kv_heads=m.impl.num_kv_heads,
                             head_size=self.head_size, block_size=self.block_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.serve = serve
        self.reqs: dict[str, _Req] = {}            # vLLM request id -> state
        self.done: dict[str, _Req] = {}            # our key -> state of finished requests
        self.free_slots: list[int] = []
        self.num_slots = 0
        self.window = 0
        self.qbuf: list[torch.Tensor] = []         # per layer [slots, window, Hq, d]
        self.step: list[tuple[int, int, int]] = []  # this step's (slot, token start, n tokens) of NGC requests

    # ------------------------------------------------------------------ request bookkeeping
    def _ensure_buffers(self, window: int, slots: int) -> None:
        if window <= self.window and slots <= self.num_slots:
            return
        w, s = max(window, self.window), max(slots, self.num_slots)
        dev, dt = self.layers[0].kv_cache.device, self.runner.model_config.dtype
        new = [torch.zeros(s, w, self.num_heads, self.head_size, device=dev, dtype=dt) for _ in self.layers]
        for old, nb in zip(self.qbuf, new):
            nb[: old.shape[0], w - old.shape[1]:] = old
        self.free_slots.extend(range(self.num_slots, s))
        self.qbuf, self.window, self.num_slots = new, w, s

    def _state(self, rid: str) -> _Req | None:
        st = self.reqs.get(rid)
        if st is not None:
            return st
        req = self.runner.requests.get(rid)
        s = settings_of(adapt("CachedRequestState", req).sampling_params, self.serve) if req is not None else None
        if s is None or s.config is None:
            return None
        self._ensure_buffers(s.config.window, 1)
        if not self.free_slots:
            self._ensure_buffers(s.config.window, 2 * self.num_slots)
        st = _Req(s, self.free_slots.pop(), self.num_layers, kept_positions=[None] * self.num_layers)
        self.reqs[rid] = st
        return st

    def _finish(self, rid: str) -> None:
        st = self.reqs.pop(rid, None)
        if st is not None:
            self.free_slots.append(st.slot)
            if st.settings.key is not None:   # a served request's decisions are read by nobody: dropped
                self.done[st.settings.key] = st

    def take(self, keys: list[str]) -> dict[str, dict]:
        """Decisions and flags of the requests ``keys`` (finished ones), forgotten afterwards."""
        live = {st.settings.key: rid for rid, st in self.reqs.items()}
        out = {}
        for k in keys:
            if k in live:
                self._finish(live[k])
            st = self.done.pop(k, None)
            if st is not None:
                out[k] = {"rounds": st.rounds, "preempted": st.preempted}
        return out

    # ------------------------------------------------------------------ hooks
    def before_update_states(self, so) -> None:
        """``so``: vLLM's ``SchedulerOutput``, with the scheduler's :class:`.scheduler.StepInfo` as ``rlmem``."""
        self.step = []
        for rid in adapt("SchedulerOutput", so).finished_req_ids:
            self._finish(rid)
        info = getattr(so, "rlmem", None)
        if info is None:
            return
        for rid in info.preempted:
            st = self.reqs.get(rid)
            if st is not None:   # recomputed with a full cache: the cache again holds positions 0..
                st.preempted = True
                st.last_t, st.kept_positions = 0, [None] * self.num_layers
        if info.rounds:
            self.run_rounds(info.rounds)

    def after_prepare_inputs(self, so) -> None:
        r = self.runner
        num_reqs = r.input_batch.num_reqs
        req_ids = r.input_batch.req_ids[:num_reqs]
        info = getattr(so, "rlmem", None)
        offsets = info.offsets if info is not None else {}
        qsl = r.query_start_loc.np
        self.step = []
        row_off = np.zeros(num_reqs, dtype=np.int64)
        for i, rid in enumerate(req_ids):
            st = self._state(rid)
            if st is None:
                continue
            start, n = int(qsl[i]), int(qsl[i + 1] - qsl[i])
            self.step.append((st.slot, start, n))
            row_off[i] = offsets.get(rid, 0)
        if not row_off.any():
            return
        total = adapt("SchedulerOutput", so).total_num_scheduled_tokens
        seq_lens, optimistic = r.seq_lens, r.optimistic_seq_lens_cpu
        seq_lens[:num_reqs] -= torch.from_numpy(row_off).to(seq_lens.device).to(seq_lens.dtype)
        optimistic[:num_reqs] -= torch.from_numpy(row_off).to(optimistic.dtype)
        eff = cache_positions(r.positions[:total], row_off, qsl)
        r.input_batch.block_table.compute_slot_mapping(num_reqs, r.query_start_loc.gpu[: num_reqs + 1], eff)

    def stash_queries(self, layer: int, query: torch.Tensor) -> None:
        if not self.step:
            return
        q = query.reshape(query.shape[0], self.num_heads, self.head_size)
        buf = self.qbuf[layer]
        dec = [(s, st) for s, st, n in self.step if n == 1]
        if dec:
            slots = torch.tensor([s for s, _ in dec], device=buf.device)
            toks = torch.tensor([t for _, t in dec], device=buf.device)
            buf[slots] = torch.cat([buf[slots, 1:], q[toks, None].to(buf.dtype)], dim=1)
        for s, start, n in self.step:
            if n > 1:
                buf[s] = torch.cat([buf[s], q[start: start + n].to(buf.dtype)])[-self.window:]

    def run_rounds(self, rounds: dict) -> None:
        """One NGC round on every layer for each request in ``rounds`` (vLLM id -> scheduler's RoundPlan)."""
        due = []
        for rid, plan in rounds.items():
            st = self.reqs.get(rid)
            req = self.runner.requests.get(rid)
            if st is None or req is None:
                continue
            ids = adapt("CachedRequestState", req).block_ids[0]
            if len(ids) != plan.num_blocks:
                raise RuntimeError(f"rlmem vLLM worker: request {rid} has {len(ids)} blocks at round t={plan.t}, "
                                   f"the scheduler planned {plan.num_blocks}")
            due.append((rid, st, plan, ids))
        groups: dict[tuple, list] = {}
        for item in due:
            c = item[1].settings.config
            groups.setdefault((c.block_size, c.window, c.score_transform, c.tau, c.scorer, c.scorer_args,
                               item[1].settings.greedy), []).append(item)
        for (_, window, _, _, scorer_name, scorer_args, greedy), items in groups.items():
            self._round_group(items, window, get_scorer(scorer_name, **scorer_args), greedy)
        for rid, st, plan, ids in due:
            del ids[plan.keep:]
            row = self.runner.input_batch.req_id_to_index.get(rid)
            if row is not None:
                for bt in self.runner.input_batch.block_table.block_tables:
                    adapt("BlockTable", bt).num_blocks_per_row[row] = plan.keep
            st.last_t = plan.t

    def _round_group(self, items: list, window: int, scorer, greedy: bool) -> None:
        cfgs = [st.settings.config for _, st, _, _ in items]
        c_max = max(plan.n_alive for _, _, plan, _ in items)
        prompt_lens = torch.tensor([adapt("CachedRequestState", self.runner.requests[rid]).num_prompt_tokens
                                    for rid, _, _, _ in items])
        per_req = [[] for _ in items]
        new_kept = [[None] * self.num_layers for _ in items]
        for layer, module in enumerate(self.layers):
            kv = module.kv_cache
            hkv = kv.shape[1]
            keys = kv.new_zeros(len(items), hkv, c_max, self.head_size)
            valid = torch.zeros(len(items), c_max, dtype=torch.bool, device=kv.device)
            positions = torch.full((len(items), c_max), -1, dtype=torch.long)
            for i, (_, st, plan, ids) in enumerate(items):
                block_ids = torch.tensor(ids[: plan.num_blocks], dtype=torch.long, device=kv.device)
                keys[i, :, : plan.n_alive] = self.layout.read_keys(kv, block_ids, plan.n_alive)
                valid[i, : plan.n_alive] = True
                pos = st.alive_positions(layer, plan.t)
                if len(pos) != plan.n_alive:
                    raise RuntimeError(f"rlmem vLLM worker: {len(pos)} tracked positions for {plan.n_alive} cached keys")
                positions[i, : plan.n_alive] = pos
            slots = torch.tensor([st.slot for _, st, _, _ in items], device=kv.device)
            queries = self.qbuf[layer][slots, -window:].permute(0, 2, 1, 3).to(keys.dtype)   # [B, Hq, w, d]
            inputs = ScoringInputs(queries, keys, valid, positions.to(kv.device), module.impl.scale, layer, None,
                                   prompt_lens)
            decisions = decide(scorer, inputs, cfgs, self.generator, greedy)
            for i, ((_, st, plan, ids), d) in enumerate(zip(items, decisions)):
                if d.num_blocks != plan.num_blocks:
                    raise RuntimeError(f"rlmem vLLM worker: policy saw {d.num_blocks} blocks, scheduler {plan.num_blocks}")
                src, dst = block_moves(ids, d.kept, Shrink(plan.n_alive, plan.num_blocks, plan.keep, 0),
                                       st.settings.config.protect_recent)
                copy_blocks(kv, src.to(kv.device), dst.to(kv.device))
                per_req[i].append((d.num_blocks, list(d.kept), float(d.logprob)))
                new_kept[i][layer] = positions[i, torch.tensor(d.keep_slots, dtype=torch.long)]
        for i, (_, st, plan, _) in enumerate(items):
            new_len = plan.n_alive - (plan.num_blocks - plan.keep) * st.settings.config.block_size
            st.rounds.append((plan.t, plan.n_alive, new_len, per_req[i]))
            st.kept_positions = new_kept[i]

    def patch_sampler_output(self, logits: torch.Tensor, metadata, out) -> None:
        """Overwrite the sampled tokens' log-probs with the untruncated ``log_softmax(logits / T)``."""
        out = adapt("SamplerOutput", out)
        lt = out.logprobs_tensors
        if lt is None:
            return
        temp = adapt("SamplingMetadata", metadata).temperature
        if temp is None:
            temp = torch.ones(logits.shape[0], device=logits.device)
        temp = torch.where(temp < 1e-5, torch.ones_like(temp), temp)
        sampled = out.sampled_token_ids[:, :1].long()
        lp = token_log_softmax(logits, temp[: logits.shape[0]]).gather(-1, sampled)
        lt.logprobs[:, :1] = lp.to(lt.logprobs.dtype)


class NGCWorkerExtension:
    """Methods mixed into every vLLM worker; reached with ``LLM.collective_rpc``."""

    def rlmem_install(self, seed: int = 0) -> dict:
        """Check vLLM's internals (:mod:`.internals`) on this worker, then hook its runner (once)."""
        if getattr(self, "rlmem_state", None) is not None:
            return self.rlmem_info
        check_live("Worker", self)
        worker = adapt("Worker", self)
        serve = ServeDefaults.from_additional_config(worker.vllm_config.additional_config)
        runner = worker.model_runner
        st = self.rlmem_state = NGCWorkerState(runner, seed, serve)

        update_states, prepare_inputs, sampler_forward = runner._update_states, runner._prepare_inputs, runner.sampler.forward

        def _update_states(scheduler_output):
            st.before_update_states(scheduler_output)
            return update_states(scheduler_output)

        def _prepare_inputs(scheduler_output, *args, **kwargs):
            out = prepare_inputs(scheduler_output, *args, **kwargs)
            st.after_prepare_inputs(scheduler_output)
            return out

        def _sampler_forward(logits, sampling_metadata, *args, **kwargs):
            saved = logits.detach().clone()
            out = sampler_forward(logits, sampling_metadata, *args, **kwargs)
            st.patch_sampler_output(saved, sampling_metadata, out)
            return out

        runner._update_states, runner._prepare_inputs = _update_states, _prepare_inputs
        if serve is None:   # rollouts record untruncated log-probs; a served request gets vLLM's own
            runner.sampler.forward = _sampler_forward
        for i, module in enumerate(st.layers):
            impl_forward = module.impl.forward

            def forward(layer, query, *args, _i=i, _f=impl_forward, **kwargs):
                if kwargs.get("attn_metadata", args[3] if len(args) > 3 else None) is not None:
                    st.stash_queries(_i, query)
                return _f(layer, query, *args, **kwargs)

            module.impl.forward = forward
        self.rlmem_info = {"num_layers": st.num_layers, "block_size": st.block_size, "layout": st.layout.name,
                           "num_kv_blocks": int(runner.kv_cache_config.num_blocks)}
        return self.rlmem_info

    def rlmem_take(self, keys: list[str]) -> dict[str, dict]:
        return self.rlmem_state.take(keys)

    def rlmem_tracked(self) -> dict[str, int]:
        """How many requests the worker holds state for: ``live`` (a finished request's id reaches the
        worker with the next step) and ``done`` (finished, decisions not yet taken; a served request's
        are never kept). A long-running server must keep both bounded."""
        st = getattr(self, "rlmem_state", None)
        return {"live": len(st.reqs), "done": len(st.done)} if st is not None else {"live": 0, "done": 0}

    def rlmem_stage_weights(self, bucket) -> int:
        """Receive one :class:`~rlmem.models.weight_buckets.Bucket` of HF-named tensors; they are loaded
        together by :meth:`rlmem_commit_weights`."""
        from rlmem.models.weight_buckets import unpack_bucket

        named = unpack_bucket(bucket)
        staged = getattr(self, "rlmem_staged", None)
        if staged is None:
            staged = self.rlmem_staged = []
        staged.extend(named)
        return len(named)

    def rlmem_commit_weights(self) -> int:
        """Load every staged tensor with vLLM's in-place ``reload_weights``: the model's own
        ``load_weights`` (HF names onto fused parameters) wrapped in vLLM's layer-wise
        re-processing, which the CPU build needs after its weights were repacked at start-up."""
        staged, self.rlmem_staged = getattr(self, "rlmem_staged", None) or [], None
        adapt("Worker", self).reload_weights(weights_iterator=iter(staged), is_checkpoint_format=True)
        return len(staged)

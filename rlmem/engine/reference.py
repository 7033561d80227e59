"""The torch reference rollout engine: batched NGC generation for HF causal LMs with RoPE.

Ground truth for every other engine, and the CPU default. Each layer's cache is physically
compacted at every round (memory really goes down), keys keep the true RoPE positions they were
written with, and every eviction decision comes from :mod:`rlmem.eviction.policy`.

Generation loop per sequence (docs/design.md section 1, Schedule): prefill the prompt, sample ``x_p``;
then repeatedly: stop if the last sampled token ends the sequence; else, if a round is due at
``t`` (the position about to be fed), run it on every layer; feed ``x_t``; sample ``x_{t+1}``.
So a round fires only when ``x_{t_r}`` will be fed, exactly as the replay assumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlmem.engine.base import GenerationStats
from rlmem.engine.cache import CompactingKVCache
from rlmem.engine.sampling import SamplingParams, sample_tokens
from rlmem.eviction.policy import EvictionConfig, check_batch_configs, decide, is_round
from rlmem.eviction.record import EvictionRound, EvictionTrace, LayerEviction, RolloutRecord
from rlmem.eviction.scorers import Scorer, ScoringInputs, get_scorer
from rlmem.metrics import peak_kv_entries
from rlmem.models.interface import check_supported, decoder, install, lm_head, register_attention
from rlmem.models.loading import load_model_and_tokenizer


@dataclass
class _StepState:
    """What the engine's attention function needs for one forward pass (passed through kwargs)."""

    cache: CompactingKVCache
    prefill_lens: torch.Tensor | None = None   # set during prefill
    positions: torch.Tensor | None = None      # [B] true positions of a decode step's tokens
    observer: Scorer | None = None             # a scorer that accumulates state every step (H2O)


def _engine_attention(module, query, key, value, attention_mask, *, state: _StepState, scaling=None, **kwargs):
    """Attention over the compacted per-layer cache. query ``[B, Hq, q, d]``, key/value ``[B, Hkv, q, d]``."""
    layer = module.layer_idx
    cache = state.cache
    if state.prefill_lens is not None:
        p = query.shape[2]
        lens = state.prefill_lens.to(query.device)
        idx = torch.arange(p, device=query.device)
        mask = (idx[None, :] <= idx[:, None])[None] & (idx[None, None, :] < lens[:, None, None])
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
        cache.prefill(layer, query, key, value, state.prefill_lens)
        if state.observer is not None:
            st = cache.scorer_state(layer)
            real_queries = mask & (idx[None, :, None] < lens[:, None, None])   # padding queries see nothing
            st[:, :p] = state.observer.observe(query, key, real_queries, scaling, st[:, :p])
    else:
        cache.append(layer, query, key, value, state.positions)
        k, v, valid = cache.view(layer)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, k, v, attn_mask=valid[:, None, None, :], scale=scaling, enable_gqa=True)
        if state.observer is not None:
            st = cache.scorer_state(layer)
            n = k.shape[2]
            st[:, :n] = state.observer.observe(query, k, valid[:, None, :], scaling, st[:, :n])
    return out.transpose(1, 2).contiguous(), None


register_attention("rlmem_engine", _engine_attention)


def from_pretrained(model_path: str, *, dtype: str = "float32", seed: int = 0, device: str = "cpu",
                    **options) -> "ReferenceEngine":
    """The registry's factory for ``torch`` (:mod:`rlmem.engine.registry`)."""
    if options:
        raise ValueError(f"torch engine: unknown options {sorted(options)}")
    model, tokenizer = load_model_and_tokenizer(model_path, dtype, device=device)
    return ReferenceEngine(model, tokenizer, seed=seed)


class ReferenceEngine:
    """Batched NGC generation. One instance per model; not thread-safe."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, seed: int = 0,
                 eos_token_ids: list[int] | None = None, pad_token_id: int | None = None):
        check_supported(model)
        self.model = model
        self.tokenizer = tokenizer
        self.generator = torch.Generator().manual_seed(seed)
        if eos_token_ids is None:
            eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
            if eos is None and tokenizer is not None:
                eos = tokenizer.eos_token_id
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = set(eos_token_ids)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.attention_modules = sorted(
            (m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")), key=lambda m: m.layer_idx)
        self.num_layers = len(self.attention_modules)
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, named_tensors) -> None:
        """Copy ``(name, tensor)`` pairs (HF parameter names) into the model in place."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"weight sync: unknown parameter {name!r}")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, "
                                     f"model expects {tuple(params[name].shape)}")
                params[name].copy_(tensor.to(params[name].dtype))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        eviction: EvictionConfig | list[EvictionConfig | None] | None = None,
        *,
        greedy_evictions: bool = False,
    ) -> list[RolloutRecord]:
        """Generate one completion per prompt; ``eviction`` may be one config or one per prompt."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        cfgs = list(eviction) if isinstance(eviction, (list, tuple)) else [eviction] * len(prompts)
        if len(cfgs) != len(prompts):
            raise ValueError(f"generate: {len(cfgs)} eviction configs for {len(prompts)} prompts")
        active_cfgs = [c for c in cfgs if c is not None and c.enabled]
        check_batch_configs(active_cfgs)
        window = max((c.window for c in active_cfgs), default=1)
        scorer = get_scorer(active_cfgs[0].scorer, **active_cfgs[0].scorer_args) if active_cfgs else None
        observer = scorer if scorer is not None and scorer.observes else None
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else self.generator
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts) + sampling.max_new_tokens
        if max_positions is not None and longest > max_positions:
            raise ValueError(f"generate: prompt + max_new_tokens = {longest} exceeds the model's "
                             f"max_position_embeddings ({max_positions})")

        start = time.perf_counter()
        self.model.eval()
        device = self.device
        bsz = len(prompts)
        cache = CompactingKVCache(self.num_layers, bsz, window)
        prompt_lens = torch.tensor([len(p) for p in prompts])
        completions: list[list[int]] = [[] for _ in range(bsz)]
        logprobs: list[list[float]] = [[] for _ in range(bsz)]
        rounds: list[list[EvictionRound]] = [[] for _ in range(bsz)]
        finish: list[str] = [""] * bsz
        sizes: list[list[tuple[int, int, int]]] = [[] for _ in range(bsz)]   # (t, held before, after) per round
        peaks = [0] * bsz
        peak_bytes = 0

        # prefill (right padding; each row attends causally within its own prompt)
        p_max = int(prompt_lens.max())
        ids = torch.full((bsz, p_max), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        pos = torch.arange(p_max)[None].expand(bsz, p_max)
        state = _StepState(cache, prefill_lens=prompt_lens, observer=observer)
        hidden = self._forward(ids.to(device), pos.to(device), state)
        last = hidden[torch.arange(bsz, device=device), (prompt_lens - 1).to(device)]
        tok, lp = sample_tokens(lm_head(self.model)(last), sampling, gen)
        for i in range(bsz):
            completions[i].append(int(tok[i]))
            logprobs[i].append(float(lp[i]))
        peak_bytes = max(peak_bytes, cache.nbytes())

        active = list(range(bsz))   # batch slot -> prompt index
        n_rounds = 0
        while True:
            keep_slots = []
            for s, i in enumerate(active):
                reason = self._finish_reason(completions[i], sampling)
                if reason:
                    finish[i] = reason
                    # the one peak rule on the sizes this cache held (the last sampled token is never fed)
                    peaks[i] = peak_kv_entries(len(prompts[i]) + len(completions[i]) - 1, sizes[i])
                else:
                    keep_slots.append(s)
            if not keep_slots:
                break
            if len(keep_slots) < len(active):
                cache.select_rows(torch.tensor(keep_slots))
                active = [active[s] for s in keep_slots]
            t = [len(prompts[i]) + len(completions[i]) - 1 for i in active]   # position to feed
            due = [s for s, i in enumerate(active) if cfgs[i] is not None and is_round(t[s], len(prompts[i]), cfgs[i])]
            if due:
                peak_bytes = max(peak_bytes, cache.nbytes())
                before = [cache.held(s) for s in due]
                self._round(cache, scorer, due, [cfgs[active[s]] for s in due], gen, greedy_evictions,
                            [rounds[active[s]] for s in due], [t[s] for s in due],
                            prompt_lens[[active[s] for s in due]])
                for s, b in zip(due, before):
                    sizes[active[s]].append((t[s], b, cache.held(s)))
                n_rounds += len(due)
            ids = torch.tensor([[completions[i][-1]] for i in active], device=device)
            pos = torch.tensor([[x] for x in t], device=device)
            hidden = self._forward(ids, pos, _StepState(cache, positions=pos[:, 0], observer=observer))
            tok, lp = sample_tokens(lm_head(self.model)(hidden[:, -1]), sampling, gen)
            for s, i in enumerate(active):
                completions[i].append(int(tok[s]))
                logprobs[i].append(float(lp[s]))
        peak_bytes = max(peak_bytes, cache.nbytes())

        records = []
        for i in range(bsz):
            cfg = cfgs[i]
            trace = EvictionTrace(cfg, rounds[i]) if cfg is not None else None
            records.append(RolloutRecord(
                prompt_ids=list(prompts[i]), completion_ids=completions[i], logprobs=logprobs[i],
                temperature=float(sampling.temperature), reward=None, eviction=trace,
                extra={"peak_kv": peaks[i], "finish_reason": finish[i]}))
        self.last_stats = GenerationStats(
            new_tokens=sum(len(c) for c in completions), seconds=time.perf_counter() - start,
            rounds=n_rounds, peak_cache_bytes=peak_bytes, per_row_peak=peaks)
        return records

    # ------------------------------------------------------------------ internals
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, state: _StepState) -> torch.Tensor:
        install(self.model)
        out = decoder(self.model)(input_ids=ids, position_ids=pos, use_cache=False, rlmem_engine=state)
        return out.last_hidden_state

    def _finish_reason(self, completion: list[int], sampling: SamplingParams) -> str:
        if completion[-1] in self.eos_token_ids:
            return "eos"
        if sampling.stop and self.tokenizer is not None:
            tail_len = max(len(s) for s in sampling.stop) * 4 + 4   # tokens are at least one byte
            tail = self.tokenizer.decode(completion[-tail_len:], skip_special_tokens=False)
            if any(tail.endswith(s) for s in sampling.stop):
                return "stop"
        if len(completion) >= sampling.max_new_tokens:
            return "length"
        return ""

    def _round(self, cache: CompactingKVCache, scorer: Scorer, slots: list[int], cfgs: list[EvictionConfig],
               gen: torch.Generator, greedy: bool, out: list[list[EvictionRound]], times: list[int],
               prompt_lens: torch.Tensor) -> None:
        """One eviction round for the rows ``slots`` on every layer (docs/design.md section 1);
        ``prompt_lens`` are those rows' prompt lengths."""
        rows = torch.tensor(slots)
        per_row: list[list[LayerEviction]] = [[] for _ in slots]
        for layer, module in enumerate(self.attention_modules):
            k, _, valid = cache.view(layer)
            r = rows.to(k.device)
            state = cache.scorer_state(layer)[r, : k.shape[2]] if scorer.observes else None
            inputs = ScoringInputs(cache.queries[layer][r], k[r], valid[r], cache.slot_positions(layer)[r],
                                   module.scaling, layer, state, prompt_lens.to(k.device))
            decisions = decide(scorer, inputs, cfgs, gen, greedy)
            for j, (slot, d) in enumerate(zip(slots, decisions)):
                cache.compact(layer, slot, d.keep_slots)
                per_row[j].append(LayerEviction(d.num_blocks, d.kept, d.logprob))
        for j, t in enumerate(times):
            out[j].append(EvictionRound(t, per_row[j]))
        cache.shrink()

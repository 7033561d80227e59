"""Replay: one forward pass over whole rollouts with per-layer eviction masks (docs/design.md section 1).

Query ``q`` may see key ``k`` in layer ``l`` iff ``k <= q and q < evicted_at[l, k]``. With those
masks the pass reproduces every next-token distribution of the rollout, and, because the NGC
scoring is recomputed inside the same pass from its own post-RoPE Q and K, every eviction
log-probability too, on the autograd graph (so the eviction loss reaches all weights).

Two attention kernels behind one API: ``"sdpa"`` (a dense boolean mask; CPU, fallback, and the
only one with a CPU backward) and ``"flex"`` (FlexAttention with a BlockMask built from
``evicted_at``; the CUDA path). They implement the same ``mask_mod`` and are tested against each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rlmem.engine.sampling import token_log_softmax
from rlmem.eviction.policy import pad_orders, plackett_luce_logprob, selection_logits
from rlmem.eviction.record import NEVER, RolloutRecord, evicted_at
from rlmem.eviction.scorers import ScoringInputs, get_scorer
from rlmem.models.interface import check_supported, decoder, install, lm_head, num_layers, register_attention

Kernel = Literal["sdpa", "flex"]
# "evicted": the per-layer replay masks (exact, on-policy). "causal": a plain causal mask for the
# tokens, the paper's off-policy ablation (eviction log-probs still score the true alive keys).
ReplayMask = Literal["evicted", "causal"]


@dataclass
class ReplayBatch:
    """Right-padded inputs of a batch of records, and their per-layer ``evicted_at``."""

    input_ids: torch.Tensor        # [B, n]
    position_ids: torch.Tensor     # [B, n]
    seq_lens: torch.Tensor         # [B]
    prompt_lens: torch.Tensor      # [B]
    evicted_at: torch.Tensor       # [B, L, n]; padded keys are -1 (never visible)
    records: list[RolloutRecord]

    @classmethod
    def from_records(cls, records: list[RolloutRecord], n_layers: int, pad_id: int = 0,
                     device: torch.device | str = "cpu") -> "ReplayBatch":
        if not records:
            raise ValueError("replay: empty batch")
        n = max(r.seq_len for r in records)
        bsz = len(records)
        ids = torch.full((bsz, n), pad_id, dtype=torch.long)
        ea = torch.full((bsz, n_layers, n), -1, dtype=torch.long)
        for i, r in enumerate(records):
            ids[i, : r.seq_len] = torch.tensor(r.prompt_ids + r.completion_ids)
            ea[i, :, : r.seq_len] = evicted_at(r, n_layers)
        pos = torch.arange(n)[None].expand(bsz, n)
        return cls(ids.to(device), pos.to(device), torch.tensor([r.seq_len for r in records], device=device),
                   torch.tensor([len(r.prompt_ids) for r in records], device=device), ea.to(device), records)


@dataclass
class _ReplayState:
    batch: ReplayBatch
    kernel: Kernel
    compute_eviction: bool
    mask: ReplayMask = "evicted"
    eviction_logprobs: dict[int, list[torch.Tensor]] = field(default_factory=dict)   # layer -> per-row [R_i]


def visibility_mask(ea_layer: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Dense ``[B, n, n]`` boolean mask for one layer: ``(k <= q) & (q < evicted_at[k])``.

    Padded query rows (``q >= seq_len``) see only themselves so that softmax stays finite.
    """
    n = ea_layer.shape[-1]
    idx = torch.arange(n, device=ea_layer.device)
    q = idx[None, :, None]
    k = idx[None, None, :]
    mask = (k <= q) & (q < ea_layer[:, None, :])
    pad_row = (q >= seq_lens[:, None, None]) & (k == q)
    return mask | pad_row


_COMPILED_FLEX = None


def _flex_attention(query, key, value, ea_layer, seq_lens, scaling):
    """FlexAttention with the replay ``mask_mod``; compiled to Triton on CUDA, eager (forward only) on CPU."""
    global _COMPILED_FLEX
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx <= q_idx) & (q_idx < ea_layer[b, kv_idx])
        return visible | ((q_idx >= seq_lens[b]) & (kv_idx == q_idx))

    bsz, _, n, _ = query.shape
    if query.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(mask_mod, bsz, None, n, n, device=query.device, _compile=True)
        return _COMPILED_FLEX(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    block_mask = create_block_mask(mask_mod, bsz, None, n, n, device=query.device)
    with warnings.catch_warnings():   # the unfused CPU path is only used to check the mask semantics
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)


def _replay_attention(module, query, key, value, attention_mask, *, state: _ReplayState, scaling=None, **kwargs):
    layer = module.layer_idx
    batch = state.batch
    ea = batch.evicted_at[:, layer]
    # the causal ablation: no key is ever evicted for the tokens (padding stays invisible)
    ea_tokens = ea if state.mask == "evicted" else torch.where(ea >= 0, torch.full_like(ea, NEVER), ea)
    if state.kernel == "flex":
        out = _flex_attention(query, key, value, ea_tokens, batch.seq_lens, scaling)
    else:
        mask = visibility_mask(ea_tokens, batch.seq_lens)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
    if state.compute_eviction:
        state.eviction_logprobs[layer] = [
            _eviction_logprobs(query[i], key[i], ea[i], rec, layer, scaling) for i, rec in enumerate(batch.records)]
    return out.transpose(1, 2).contiguous(), None


register_attention("rlmem_replay", _replay_attention)


def _eviction_logprobs(q: torch.Tensor, k: torch.Tensor, ea: torch.Tensor, rec: RolloutRecord, layer: int,
                       scaling: float) -> torch.Tensor:
    """Recompute one layer's Plackett-Luce log-prob of every recorded round of one rollout, ``[R]``.

    q ``[Hq, n, d]``, k ``[Hkv, n, d]``; all rounds of the rollout are scored as one batch, through
    the same scorer and :func:`selection_logits` the engine used. The alive keys at round ``t`` are
    ``{k < t : evicted_at[k] >= t}`` (evicted *at* t means it was still alive when the round scored
    it). A heuristic scorer's decisions are not actions of the policy: their log-prob is 0.
    """
    trace = rec.eviction
    if trace is None or not trace.rounds:
        return q.new_zeros(0)
    cfg = trace.config
    scorer = get_scorer(cfg.scorer)
    if not scorer.learned:
        return q.new_zeros(len(trace.rounds))
    times = torch.tensor([r.t for r in trace.rounds], device=q.device)
    win = times[:, None] - cfg.window + torch.arange(cfg.window, device=q.device)[None, :]    # [R, w]
    queries = q[:, win].permute(1, 0, 2, 3)                                                   # [R, Hq, w, d]
    n = k.shape[1]
    pos = torch.arange(n, device=q.device)
    valid = (pos[None, :] < times[:, None]) & (ea[None, :] >= times[:, None])                 # [R, n]
    keys = k[None].expand(len(trace.rounds), *k.shape)
    positions = torch.where(valid, pos[None, :], torch.full_like(valid, -1, dtype=torch.long))
    inputs = ScoringInputs(queries, keys, valid, positions, scaling, layer)
    cfgs = [cfg] * len(trace.rounds)
    z, _ = selection_logits(scorer.scores(inputs), valid, cfgs, learned=True)
    orders = pad_orders([rnd.layers[layer].kept for rnd in trace.rounds], q.device)
    return plackett_luce_logprob(z, orders)


@dataclass
class ReplayOutput:
    token_logprobs: torch.Tensor      # [B, Tc] log π(o_t | surviving cache) under softmax(logits/T)
    token_mask: torch.Tensor          # [B, Tc]
    eviction_logprobs: torch.Tensor   # [B, R, L] Plackett-Luce log-probs, recomputed on the graph
    round_mask: torch.Tensor          # [B, R]


def replay_forward(model: torch.nn.Module, records: list[RolloutRecord], *, kernel: Kernel = "sdpa",
                   compute_eviction: bool = True, pad_id: int = 0, mask: ReplayMask = "evicted") -> ReplayOutput:
    """Replay ``records`` through ``model`` in one forward pass (gradients flow when enabled).

    ``mask="causal"`` is the paper's ablation: tokens see every earlier key (off-policy when the
    rollout evicted), eviction log-probs are still recomputed over the keys alive at each round.
    """
    check_supported(model)
    if kernel not in ("sdpa", "flex"):
        raise ValueError(f"replay kernel must be 'sdpa' or 'flex' (got {kernel!r})")
    if mask not in ("evicted", "causal"):
        raise ValueError(f"replay mask must be 'evicted' or 'causal' (got {mask!r})")
    n_layers = num_layers(model)
    device = next(model.parameters()).device
    batch = ReplayBatch.from_records(records, n_layers, pad_id, device)
    state = _ReplayState(batch, kernel, compute_eviction, mask)
    install(model)   # stays installed: gradient-checkpointed backward re-enters the same attention
    hidden = decoder(model)(input_ids=batch.input_ids, position_ids=batch.position_ids,
                            use_cache=False, rlmem_replay=state).last_hidden_state
    # logits only at the positions that predict completion tokens: p-1 .. n-2
    bsz = len(records)
    tc = max(len(r.completion_ids) for r in records)
    t_idx = torch.arange(tc, device=device)
    token_mask = t_idx[None, :] < torch.tensor([len(r.completion_ids) for r in records], device=device)[:, None]
    src = (batch.prompt_lens[:, None] - 1 + t_idx[None, :]).clamp_max(hidden.shape[1] - 1)
    h = torch.gather(hidden, 1, src[..., None].expand(bsz, tc, hidden.shape[-1]))
    logits = lm_head(model)(h)
    # float64 here: token_log_softmax rounds T once, to the compute dtype, as the engines do
    logp = token_log_softmax(logits, torch.tensor([r.temperature for r in records], dtype=torch.float64, device=device))
    targets = torch.zeros(bsz, tc, dtype=torch.long, device=device)
    for i, r in enumerate(records):
        targets[i, : len(r.completion_ids)] = torch.tensor(r.completion_ids, device=device)
    token_lp = torch.gather(logp, -1, targets[..., None]).squeeze(-1).masked_fill(~token_mask, 0.0)

    r_max = max((r.num_rounds for r in records), default=0)
    round_mask = torch.arange(r_max, device=device)[None, :] < torch.tensor([r.num_rounds for r in records], device=device)[:, None]
    ev = token_lp.new_zeros(bsz, r_max, n_layers)
    if compute_eviction and r_max:
        rows = []
        for i in range(bsz):
            per_layer = torch.stack([state.eviction_logprobs[l][i] for l in range(n_layers)], dim=-1)   # [R_i, L]
            rows.append(torch.nn.functional.pad(per_layer.to(ev.dtype), (0, 0, 0, r_max - per_layer.shape[0])))
        ev = torch.stack(rows)
    return ReplayOutput(token_lp, token_mask, ev, round_mask)


def rollout_logprobs(records: list[RolloutRecord], n_layers: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> ReplayOutput:
    """The records' stored rollout log-probs in :class:`ReplayOutput` layout (the ``old`` policy)."""
    bsz = len(records)
    tc = max(len(r.completion_ids) for r in records)
    r_max = max((r.num_rounds for r in records), default=0)
    tok = torch.zeros(bsz, tc, dtype=dtype)
    tmask = torch.zeros(bsz, tc, dtype=torch.bool)
    ev = torch.zeros(bsz, r_max, n_layers, dtype=dtype)
    rmask = torch.zeros(bsz, r_max, dtype=torch.bool)
    for i, r in enumerate(records):
        tok[i, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=dtype)
        tmask[i, : len(r.logprobs)] = True
        for j, rnd in enumerate(r.eviction.rounds if r.eviction else []):
            ev[i, j] = torch.tensor([l.logprob for l in rnd.layers], dtype=dtype)
            rmask[i, j] = True
    return ReplayOutput(tok.to(device), tmask.to(device), ev.to(device), rmask.to(device))

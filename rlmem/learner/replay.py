"""Replay: one forward pass over whole rollouts with per-layer eviction masks (docs/design.md section 1).

Query ``q`` may see key ``k`` in layer ``l`` iff ``k <= q and q < evicted_at[l, k]``. With those
masks the pass reproduces every next-token distribution of the rollout, and, because the NGC
scoring is recomputed inside the same pass from its own post-RoPE Q and K, every eviction
log-probability too, on the autograd graph (so the eviction loss reaches all weights).

Two attention kernels behind one API: ``"sdpa"`` (a dense boolean mask; CPU, fallback, and the
only one with a CPU backward) and ``"flex"`` (FlexAttention with a BlockMask built from
``evicted_at``; the CUDA path). They implement the same ``mask_mod`` and are tested against each other.
The flex path pads the length to a multiple of :data:`FLEX_PAD_MULTIPLE` and compiles its
block-mask builder and its attention once per (batch, padded length) shape: a batch of varied
rollout lengths compiles a few buckets, not one kernel per length.
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
    block_masks: dict[int, object] = field(default_factory=dict)   # flex: layer (-1: causal) -> BlockMask


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


# FlexAttention pads its sequence length up to a multiple of this, so that the compiled kernels and
# block-mask builders are made once per length bucket, not once per distinct rollout length.
FLEX_PAD_MULTIPLE = 128
# Which torch.compile backend the flex path uses per device type. CUDA: inductor (fused Triton
# kernels). CPU: "eager", which still goes through Dynamo (same guards, same recompiles per shape) and
# runs FlexAttention's reference math, so the once-per-bucket rule is measurable on a CPU.
FLEX_COMPILE_BACKEND: dict[str, object] = {"cuda": "inductor", "cpu": "eager"}
# Dynamo's per-function recompile limit (default 8) would send bucket 9 to slow eager attention; the
# flex functions get room for one compile per bucket up to this many (scoped, not a global change).
FLEX_RECOMPILE_LIMIT = 512
_FLEX_COMPILED: dict[tuple[str, object], tuple] = {}


def flex_padded_len(n: int, multiple: int = FLEX_PAD_MULTIPLE) -> int:
    """The length FlexAttention runs at: ``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def _replay_block_mask(ea_layer: torch.Tensor, seq_lens: torch.Tensor):
    """The BlockMask of the replay ``mask_mod`` for one layer (``ea_layer`` ``[B, n]``, already padded).

    Defined here, not per call, so that under ``torch.compile`` its guards are only the input shapes:
    a new batch of the same bucket reuses the compiled builder (its masks differ, its code does not).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx <= q_idx) & (q_idx < ea_layer[b, kv_idx])
        return visible | ((q_idx >= seq_lens[b]) & (kv_idx == q_idx))

    bsz, n = ea_layer.shape
    return create_block_mask(mask_mod, bsz, None, n, n, device=ea_layer.device)


def _flex_functions(device_type: str):
    """(block-mask builder, attention) compiled for ``device_type``, made once per process and backend."""
    from torch.nn.attention.flex_attention import flex_attention

    backend = FLEX_COMPILE_BACKEND.get(device_type, "eager")
    key = (device_type, backend)   # a backend object is a key by identity (and kept alive with its functions)
    if key not in _FLEX_COMPILED:
        _FLEX_COMPILED[key] = (torch.compile(_replay_block_mask, dynamic=False, backend=backend),
                               torch.compile(flex_attention, dynamic=False, backend=backend))
    return _FLEX_COMPILED[key]


def replay_block_mask(ea_layer: torch.Tensor, seq_lens: torch.Tensor, multiple: int = FLEX_PAD_MULTIPLE):
    """The compiled BlockMask for one layer at the padded length (padded keys never visible)."""
    n = ea_layer.shape[-1]
    n_pad = flex_padded_len(n, multiple)
    ea_pad = torch.nn.functional.pad(ea_layer, (0, n_pad - n), value=-1)
    build, _ = _flex_functions(ea_layer.device.type)
    with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
        return build(ea_pad, seq_lens)


def _flex_attention(query, key, value, block_mask, scaling):
    """FlexAttention over the padded length with ``block_mask``; the output is cut back to ``n``.

    Padded keys are invisible and padded queries see only themselves, so the padding changes no real
    row; the BlockMask skips the fully masked padded blocks, so padding costs almost nothing.
    """
    import warnings

    n = query.shape[2]
    n_pad = block_mask.seq_lengths[0]
    pad = (0, 0, 0, n_pad - n)
    q, k, v = (torch.nn.functional.pad(t, pad) for t in (query, key, value))
    _, attend = _flex_functions(query.device.type)
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
        warnings.simplefilter("ignore", UserWarning)   # CPU: the unfused reference path, for checks only
        out = attend(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out[:, :, :n]


def _replay_attention(module, query, key, value, attention_mask, *, state: _ReplayState, scaling=None, **kwargs):
    layer = module.layer_idx
    batch = state.batch
    ea = batch.evicted_at[:, layer]
    # the causal ablation: no key is ever evicted for the tokens (padding stays invisible)
    ea_tokens = ea if state.mask == "evicted" else torch.where(ea >= 0, torch.full_like(ea, NEVER), ea)
    if state.kernel == "flex":
        # one mask per layer and batch, kept for the checkpointed backward's recompute; the causal
        # ablation's mask is the same in every layer, so it is built once
        mask_key = -1 if state.mask == "causal" else layer
        if mask_key not in state.block_masks:
            state.block_masks[mask_key] = replay_block_mask(ea_tokens, batch.seq_lens)
        out = _flex_attention(query, key, value, state.block_masks[mask_key], scaling)
    else:
        mask = visibility_mask(ea_tokens, batch.seq_lens)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
    if state.compute_eviction:
        state.eviction_logprobs[layer] = eviction_logprobs(query, key, ea, batch.records, layer, scaling)
    return out.transpose(1, 2).contiguous(), None


register_attention("rlmem_replay", _replay_attention)


def eviction_logprobs(q: torch.Tensor, k: torch.Tensor, ea: torch.Tensor, records: list[RolloutRecord], layer: int,
                      scaling: float) -> list[torch.Tensor]:
    """Recompute one layer's Plackett-Luce log-prob of every recorded round, per record ``[R_i]``.

    q ``[B, Hq, n, d]``, k ``[B, Hkv, n, d]``, ea ``[B, n]`` (this layer's ``evicted_at``). All rounds
    of all records that share a scorer and block settings are scored as one batch, through the same
    scorer and :func:`selection_logits` the engine used (docs/design.md section 1). The alive keys at
    round ``t`` are ``{k < t : evicted_at[k] >= t}`` (evicted *at* t means it was still alive when
    the round scored it). A heuristic scorer's decisions are not actions: their log-prob is 0.
    """
    out = [q.new_zeros(r.num_rounds) for r in records]
    groups: dict[tuple, list[int]] = {}
    for i, rec in enumerate(records):
        if rec.num_rounds and get_scorer(rec.eviction.config.scorer).learned:
            c = rec.eviction.config
            groups.setdefault((c.scorer, c.scorer_args, c.block_size, c.window, c.score_transform, c.tau), []).append(i)
    n = k.shape[2]
    pos = torch.arange(n, device=q.device)
    for rows in groups.values():
        cfgs = [records[i].eviction.config for i in rows for _ in records[i].eviction.rounds]
        rec_idx = torch.tensor([i for i in rows for _ in records[i].eviction.rounds], device=q.device)   # [S]
        times = torch.tensor([r.t for i in rows for r in records[i].eviction.rounds], device=q.device)  # [S]
        w = cfgs[0].window
        win = times[:, None] - w + torch.arange(w, device=q.device)[None, :]                            # [S, w]
        queries = q.transpose(1, 2)[rec_idx[:, None], win].transpose(1, 2)                               # [S, Hq, w, d]
        keys = k.index_select(0, rec_idx)                                                                # [S, Hkv, n, d]
        valid = (pos[None, :] < times[:, None]) & (ea.index_select(0, rec_idx) >= times[:, None])       # [S, n]
        positions = torch.where(valid, pos[None, :], torch.full_like(pos, -1)[None, :])
        scorer = get_scorer(cfgs[0].scorer, **cfgs[0].scorer_args)
        prompt_lens = torch.tensor([len(r.prompt_ids) for r in records], device=q.device)[rec_idx]   # [S]
        inputs = ScoringInputs(queries, keys, valid, positions, scaling, layer, prompt_lens=prompt_lens)
        z, _ = selection_logits(scorer.scores(inputs), valid, cfgs, learned=True)
        orders = pad_orders([r.layers[layer].kept for i in rows for r in records[i].eviction.rounds], q.device)
        lp = plackett_luce_logprob(z, orders)
        start = 0
        for i in rows:
            out[i] = lp[start: start + records[i].num_rounds]
            start += records[i].num_rounds
    return out


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

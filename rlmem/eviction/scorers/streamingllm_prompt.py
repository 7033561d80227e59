"""StreamingLLM with the whole prompt as its sinks: keep the question, then the newest tokens.

StreamingLLM (Xiao et al. 2024, arXiv 2309.17453, ``streamingllm.py``) keeps a fixed number of
first tokens as attention sinks. Reasoning-trace compressors usually leave the question itself
uncompressed and evict only from the generated trace (R-KV, Cai et al. 2025, arXiv 2505.24133,
compresses the decoded tokens only). This rule is that practice reduced to positions: every prompt
key outranks every generated key (older prompt keys first, should the budget not hold the whole
prompt), and among generated keys newer is better. On tasks whose trace keeps consulting the
question (Countdown's target) it is the strong, simple baseline a learned policy has to beat
(docs/toy-reproduction.md, section 3).

Scores: ``2·top − position`` for a prompt key, ``position`` for a generated key, where ``top`` is
one more than the largest alive position, so that every prompt score exceeds every generated one.
Only positions and prompt lengths are used; no attention.
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer


@register_scorer
class StreamingLLMPromptScorer(Scorer):
    name = "streamingllm_prompt"

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        if inp.prompt_lens is None:
            raise ValueError("streamingllm_prompt: the scoring inputs carry no prompt lengths "
                             "(ScoringInputs.prompt_lens); every rlmem engine passes them")
        pos = inp.positions.to(inp.keys.dtype)
        top = pos.max(dim=1, keepdim=True).values + 1
        in_prompt = inp.positions < inp.prompt_lens.to(inp.positions.device)[:, None]
        s = torch.where(in_prompt, 2 * top - pos, pos)
        return s.masked_fill(~inp.valid, 0.0)

"""Tiny random Qwen2 models with a character-level tokenizer.

Nothing can be downloaded from a hub on the machines rlmem is tested on, so tests, benchmarks and
the default CPU run use a model made here, saved with ``save_pretrained`` and loaded back through
the real ``from_pretrained`` path (the test machines reach no model hub). ``head_dim`` is 64 because vLLM's CPU attention
rejects smaller heads.
"""

from __future__ import annotations

from pathlib import Path

# Special tokens. The chat-template markers are single tokens so that templated prompts stay short.
PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, "<think>", "</think>", "<answer>", "</answer>",
                  "<|user|>", "<|assistant|>", "<eviction_rate>", "</eviction_rate>"]

# A minimal chat template in the style of DeepSeek-R1-Distill: the prompt ends with "<think>\n".
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def build_char_tokenizer():
    """A character-level tokenizer: Qwen2's byte-level BPE with the 256 byte symbols and no merges.

    Every byte is one token, so any text (unicode included) encodes without an unknown token, and
    the tokenizer is a genuine ``Qwen2Tokenizer`` (what ``AutoTokenizer`` picks for a Qwen2 config).
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 4096,
) -> Path:
    """Write a random Qwen2 model and its tokenizer to ``out_dir``; return the path.

    ``hidden / heads`` must be 64 (head_dim 64). Weights are deterministic given ``seed``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden % heads or hidden // heads != 64:
        raise ValueError(f"hidden ({hidden}) / heads ({heads}) must be 64 (head_dim 64 is required by vLLM CPU)")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Random init gives near-uniform next-token distributions; a larger output scale gives the tiny
    # model some preferences so that sampling, stop conditions and rewards behave less trivially.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out

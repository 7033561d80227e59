"""Loading models and tokenizers: the one loader every part uses (dtypes from :mod:`rlmem.dtypes`).

The CLI, the engines, the learner and the rollout workers all load through here, so a bad path or
dtype gets the same clear error everywhere (naming the path and what to do), never a library
traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlmem.dtypes import torch_dtype


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the path and what to do."""


def _check_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"model {path}: GGUF file not found")
        return p
    if not p.exists():
        raise ModelLoadError(f"model {path}: no such directory (a local HF model directory is expected; "
                             "`rlmem tiny-model DIR` makes a tiny one)")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model {path}: no config.json there (a local HF model directory is expected; "
                             "`rlmem tiny-model DIR` makes a tiny one)")
    return p


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", *,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """An HF causal LM from a local directory, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = _check_dir(path)
    dt = torch_dtype(dtype)
    try:
        if p.suffix == ".gguf":
            from rlmem.models.gguf import GGUFError, load_gguf_model   # GGUF support (SmolLM2 from PyPI)

            try:
                model = load_gguf_model(p, dt)
            except GGUFError as e:
                raise ModelLoadError(f"model {e}") from None
        else:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dt)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model {path}: could not load ({type(e).__name__}: {first})") from e
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    p = _check_dir(path)
    try:
        if p.suffix == ".gguf":
            from rlmem.models.gguf import GGUFError, load_gguf_tokenizer

            try:
                return load_gguf_tokenizer(p)
            except GGUFError as e:
                raise ModelLoadError(f"model {e}") from None
        return AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model {path}: could not load its tokenizer ({type(e).__name__}: {first})") from e


def load_model_and_tokenizer(path: str | os.PathLike, dtype: str | torch.dtype = "float32", *,
                             device: str | torch.device = "cpu"):
    return load_model(path, dtype, device=device), load_tokenizer(path)

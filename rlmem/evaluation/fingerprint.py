"""What ``--model`` is, beyond its path: a fingerprint of its files, and its context length.

An eval directory's results belong to one model. Its path alone does not say which: new weights
written to the same folder are another model, and ``tiny`` and ``/abs/path/tiny`` are the same
one. So ``eval_config.json`` stores the resolved path and :func:`model_fingerprint`, and a resume
whose fingerprint differs is refused, naming the file that changed.

The fingerprint of a file is its size and a SHA-256 of its content:

* files up to :data:`FULL_HASH_BYTES` (64 MiB: config, tokenizer, chat template, small weight
  files) are hashed whole;
* larger files (the weights of a real model: a few GB, which would take tens of seconds to hash
  on every start) are hashed on their size, the first and last :data:`EDGE_BYTES` (4 MiB) and
  :data:`SAMPLES` evenly spaced 1 MiB chunks between them: about 16 MiB read per file. A
  safetensors header (tensor names, shapes, offsets) sits in the first chunk, and new weights
  (a fine-tune, another checkpoint) change every tensor, so they change every chunk; a change
  confined to bytes between the sampled chunks would not be seen. The entry says which rule was
  used (``"hash": "full"`` or ``"sampled"``).

Modification times are not used: copying a model changes them and not the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 4 << 20
CHUNK_BYTES = 1 << 20
SAMPLES = 8


def resolve_model(model: str) -> str:
    """``--model`` as an absolute path with symlinks resolved, when it names an existing file or
    folder (``tiny`` and ``/abs/path/tiny`` are one setting); anything else as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def _file_hash(path: Path, size: int) -> tuple[str, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest(), "full"
        h.update(str(size).encode())
        step = (size - 2 * EDGE_BYTES) // (SAMPLES + 1)
        spans = [(0, EDGE_BYTES)] + [(EDGE_BYTES + step * (i + 1), CHUNK_BYTES) for i in range(SAMPLES)] + \
                [(size - EDGE_BYTES, EDGE_BYTES)]
        for offset, length in spans:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest(), "sampled"


def model_fingerprint(model: str) -> dict[str, dict[str, Any]]:
    """``{file: {"size", "sha256", "hash"}}`` for every file of a model folder (hidden files and
    folders skipped, subfolders included), or for the one ``.gguf`` file; ``{}`` when ``model``
    is neither (the loader then says what is wrong with it)."""
    p = Path(model).expanduser()
    if p.is_file():
        files = [(p.name, p)]
    elif p.is_dir():
        files = sorted((str(f.relative_to(p)), f) for f in p.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    else:
        return {}
    out = {}
    for name, f in files:
        size = f.stat().st_size
        digest, how = _file_hash(f, size)
        out[name] = {"size": size, "sha256": digest, "hash": how}
    return out

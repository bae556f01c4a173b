"""Every test runs offline, without DYNBERT_DEBUG, on one thread, with an empty Hugging Face cache."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Before anything imports huggingface_hub (which reads it once): a model or dataset in the user's
# cache must not make an "offline hub name fails" test pass or fail by machine.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dynbert-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""GLUE's own files and pretrained checkpoints, beside a checkout (a fresh clone has none)."""


def pytest_runtest_setup(item):
    """``@pytest.mark.requires_data("glue", ...)``: skip, naming what is missing, where ../shared/data
    (or one of those paths in it) is absent."""
    marker = item.get_closest_marker("requires_data")
    if marker is not None:
        missing = [path for path in [SHARED_DATA, *(SHARED_DATA / name for name in marker.args)] if not path.exists()]
        if missing:
            pytest.skip(f"real data not found at {missing[0]} (a fresh clone has no ../shared)")


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("DYNBERT_DEBUG", raising=False)
    # Two shared cores: threads only contend. Subprocesses (sweeps, kill-and-resume) read the env.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Every test runs offline, without DYNBERT_DEBUG, on one thread, with an empty Hugging Face cache."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Before anything imports huggingface_hub (which reads it once): a model or dataset in the user's
# cache must not make an "offline hub name fails" test pass or fail by machine.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dynbert-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)


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

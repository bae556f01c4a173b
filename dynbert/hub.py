"""Reaching the Hugging Face hub, or failing fast when it cannot be reached."""

from __future__ import annotations

import os
import socket

_HUB_HOST = ("huggingface.co", 443)


def go_offline_if_unreachable(timeout: float = 2.0) -> bool:
    """Switch the hub clients to offline mode when the hub cannot be reached. Returns offline.

    Without this, a machine with no network waits through the clients' timeouts and retries
    before failing; offline, they fail at once (or load from the local cache).
    """
    if _offline_requested():
        _set_offline()
        return True
    try:
        socket.create_connection(_HUB_HOST, timeout=timeout).close()
        return False
    except OSError:
        _set_offline()
        return True


def _offline_requested() -> bool:
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def _set_offline() -> None:
    # The clients read these flags once, at import: set the environment and the loaded constants.
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass

"""A hub model name checked before anything loads it: in the Hugging Face cache, or the hub reachable.

Without this, a name the machine cannot fetch (no network, offline mode, a typo) reached transformers, which
retried for about a minute and ended in a traceback. Here it is one ``kotune: error:`` line, at once, naming what
to do: download the model once where there is a network, run with ``--offline``, or point at a local folder.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from kotune.errors import KotuneError


class HubModelError(KotuneError, RuntimeError):
    """A hub model that is neither in the cache nor reachable; the message says what to do."""

    refusal = True


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
"""What ``kotune --offline`` sets: the hub libraries then read their caches only."""


def go_offline() -> None:
    """``--offline``: the hub libraries read their caches and never the network (set before they are imported)."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_hub_model(name: str, timeout: float = 5.0) -> None:
    """Return when ``name``'s config.json is in the cache or the hub answers a connection within ``timeout``
    seconds; raise HubModelError otherwise."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    remedy = (
        f"download it once where there is a network (`hf download {name}`) and run with --offline, "
        "or set model.path to a local model folder"
    )
    if is_offline():
        raise HubModelError(f"model.path {name}: a hub model that is not in the Hugging Face cache, offline; {remedy}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise HubModelError(
            f"model.path {name}: a hub model that is not in the Hugging Face cache, and {host} cannot be reached "
            f"({exc}); {remedy}"
        ) from None

"""The unit tier's guard holds: no outbound connection, and kotune's cache is not the user's ``~/.cache/kotune``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


def test_outbound_connections_are_refused():
    with pytest.raises(OSError, match="tests/unit is offline"):
        socket.create_connection(("pypi.org", 443), timeout=1)
    with pytest.raises(OSError, match="tests/unit is offline"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 9))


def test_kotune_cache_is_an_empty_folder_of_this_session():
    cache = Path(os.environ["KOTUNE_CACHE"])
    assert cache != Path.home() / ".cache" / "kotune" and cache.is_dir()

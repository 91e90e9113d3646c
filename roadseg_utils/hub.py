"""Hugging Face Hub helpers: reachability, model cards and publishing."""

from __future__ import annotations

import socket
from functools import cache
from urllib.parse import urlparse

from huggingface_hub import constants


@cache
def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection (False at once when offline mode is set)."""
    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False

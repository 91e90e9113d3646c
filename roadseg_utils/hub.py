"""Hugging Face Hub access: reachability, and pushing files in one commit (model cards are in `card`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

from .cli import one_line


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


class HubPublishError(RuntimeError):
    """Reading a card from or pushing to the Hub failed; the message is one line and never holds the token."""


def require_hub(purpose: str) -> None:
    """Raise `HubPublishError` (one line naming ``purpose``) when the Hub cannot be reached, offline mode included."""
    if not hub_is_reachable():
        raise HubPublishError(f"{purpose}: the Hugging Face Hub is not reachable (offline, or HF_HUB_OFFLINE is set)")


def push_files_to_hub(
    repo_id: str,
    files: Mapping[str, str | os.PathLike[str]],
    token: str | None = None,
    commit_message: str = "Upload files",
    private: bool = False,
) -> str:
    """Create ``repo_id`` if needed and upload ``files`` ({path in repo: local file}) in one commit; its URL."""
    missing = [str(path) for path in files.values() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot push to {repo_id}: {', '.join(missing)} not found")
    if not hub_is_reachable():
        raise HubPublishError(f"cannot push to {repo_id}: the Hugging Face Hub is not reachable (offline?)")
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message)
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise HubPublishError(f"pushing to {repo_id} failed: {one_line(err, token)}") from err
    return commit.commit_url

"""Loading parts from local directories or the Hugging Face hub, with one clear sentence when that fails.

Hub ids are tried from the local cache first; with ``HF_HUB_OFFLINE=1`` nothing is downloaded. mmkit never
fetches anything the recipe did not name.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path


def is_local(path: str | None) -> bool:
    return path is not None and Path(path).expanduser().exists()


class HubUnavailableError(OSError):
    """A hub id could not be loaded (no network, or no such repository)."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """The hub endpoint (``HF_ENDPOINT`` or huggingface.co) when a TCP connection to it fails, else None."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return endpoint
    return None


def from_pretrained(loader, name: str, what: str, key: str = "the recipe key", **kwargs):
    """Call ``loader(name)`` for a local directory or a hub id; a failed download is one clear sentence.

    Hub ids are tried from the local cache first, so a cached model loads without touching the network.
    """
    if is_local(name):
        return loader(str(Path(name).expanduser()), **kwargs)
    if name.startswith(("/", "./", "../", "~")):  # a path, not a hub id: say so instead of trying the hub
        raise HubUnavailableError(f"{key}: {what} directory {name!r} does not exist")
    try:
        return loader(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    try:
        if hub_offline():
            raise OSError("HF_HUB_OFFLINE is set and the model is not in the local cache")
        endpoint = hub_unreachable()
        if endpoint:  # say so at once: huggingface_hub would retry for about a minute and a half first
            raise OSError(f"cannot connect to {endpoint} (no network?)")
        return loader(name, **kwargs)
    except OSError as exc:
        raise HubUnavailableError(
            f"{key}: could not load {what} {name!r} from the Hugging Face hub ({str(exc).splitlines()[0][:120]}); "
            f"download it where there is network (`hf download {name} --local-dir DIR`) and set {key} to DIR"
        ) from exc

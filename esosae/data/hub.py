"""Is the Hugging Face hub usable right now? Asked before any hub download.

Without this check an offline machine spends ~25 s in the hub client's retries before
failing; one short TCP connect answers the same question at once, so a hub name on an
offline machine fails with a one-line error instead of what looks like a hang.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from huggingface_hub import constants

CONNECT_TIMEOUT_S = 5.0


def hub_unavailable() -> str | None:
    """Why the hub cannot be reached (HF_HUB_OFFLINE, no route), or None when it can."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot reach {host}: {e.strerror or e}"
    return None

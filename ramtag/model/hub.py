"""Whether the Hugging Face hub can be reached: asked once, with a short timeout, before any download.

Without network huggingface_hub retries every request with back-off (about 50 s for one open_clip model) before
it gives up. One TCP connect to the hub (or to the proxy that reaches it) settles the question in at most
:data:`PROBE_TIMEOUT_S`; when it fails, the hub is switched to offline mode, so files already in its cache still
load and a missing one fails at once.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.request
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 2.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def offline_choices(name: str, tag: str | None) -> str:
    """What a user without network can do instead, in one clause (each error that needs it says it)."""
    return (
        f"offline, use weights on disk: --pretrained FILE (fetch them with `ramtag model fetch {name} {tag or 'TAG'} "
        "--to DIR` on a machine with network), a ramtag --checkpoint, or --model demo"
    )


def offline_by_setting() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) says so: no probe is made."""
    return any(
        os.environ.get(variable, "").strip().lower() in ("1", "on", "yes", "true")
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_address() -> tuple[str, int]:
    """Host and port a download connects to first: the HTTPS proxy when one is set, else the hub (HF_ENDPOINT)."""
    proxy = urllib.request.getproxies().get("https")
    url = urlsplit(proxy if proxy and "://" in proxy else os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    default_port = 80 if url.scheme == "http" else 443
    return url.hostname or "huggingface.co", url.port or default_port


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One connection attempt to :func:`hub_address`, at most ``timeout`` seconds (name lookup included)."""
    if offline_by_setting():
        return False
    host, port = hub_address()
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    # A thread bounds the name lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, name="ramtag-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


@contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """Within the block huggingface_hub serves cached files and requests nothing (so it never retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # open_clip then downloads from its URLs, which fail at once without network
        yield
        return
    if not offline:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # what constants.is_offline_mode() reads on every request
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved

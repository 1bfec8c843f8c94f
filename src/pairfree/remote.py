"""Hugging Face Hub access that fails fast and clearly when there is no network.

Without network, transformers / open_clip / huggingface_hub retry for tens of seconds and then print
a long traceback. `hub_access` probes the endpoint once per process (a TCP connect with a short
timeout); when it cannot be reached, the block runs in the hub's offline mode, so files already in
the cache load at once, and a file that is not there raises one `OfflineError` that says what was
wanted, where the cache is, and how to get the file onto this machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from typing import Iterator

_PROBE: dict[str, str | None] = {}  # endpoint -> None (reachable) or the reason it is not


class OfflineError(OSError):
    """A file is needed from the Hugging Face Hub, is not cached, and the Hub cannot be reached."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _env_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable_reason(url: str | None = None, timeout: float = 3.0) -> str | None:
    """None when `url`'s host (default: the Hub endpoint) accepts a TCP connection (checked once per
    process and host), else why not. HF_HUB_OFFLINE=1 makes the Hub count as unreachable."""
    if url is None:
        if _env_offline():
            return "HF_HUB_OFFLINE is set"
        url = endpoint()
    url = urllib.parse.urlunsplit(urllib.parse.urlsplit(url)[:2] + ("", "", ""))
    if url not in _PROBE:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
            _PROBE[url] = None
        except OSError as e:
            _PROBE[url] = f"{parts.hostname}:{port} unreachable ({type(e).__name__}: {e})"
    return _PROBE[url]


def hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers / open_clip
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


@contextlib.contextmanager
def hub_access(what: str, repo: str, hint: str = "") -> Iterator[None]:
    """Run a block that may download `repo` from the Hub (see the module docstring).

    `what` names the thing for the message ("CLIP checkpoint", "laion-clap checkpoint"); `hint`
    adds how to place the file by hand."""
    reason = unreachable_reason()
    if reason is None:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        constants = None
    saved = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise OfflineError(
            f"{what} {repo!r} is not in the Hugging Face cache ({hub_cache_dir()}) and {endpoint()} cannot be "
            f"reached: {reason}. On a machine with network run `hf download {repo}` and copy the cache here, "
            f"or give a local path{'; ' + hint if hint else ''} (underlying error: {first})"
        ) from e
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved

"""Asking a server whether it answers, within seconds: the libraries behind downloads (tfds,
huggingface_hub) retry an unreachable host for minutes before they give up."""

from __future__ import annotations

import http.client
import threading
import urllib.error
import urllib.request

__all__ = ["PROBE_TIMEOUT_S", "describe", "probe"]

PROBE_TIMEOUT_S = 10.0


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> Exception | None:
    """What fetching the first byte of `url` raised (an `urllib.error.HTTPError` when the server
    refused it, a `TimeoutError` when nothing answered within `timeout`), or None when it came.

    Runs in a daemon thread, because name resolution has no timeout of its own.
    """
    errors: list[Exception | None] = []

    def fetch() -> None:
        try:
            request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
            with urllib.request.urlopen(request, timeout=timeout):
                errors.append(None)
        except (OSError, ValueError, http.client.HTTPException) as e:  # DNS, refused, TLS, URL...
            errors.append(e)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(timeout)
    # The socket's own timeout and this join end together; either way it is the same answer.
    if not errors or isinstance(getattr(errors[0], "reason", errors[0]), TimeoutError):
        return TimeoutError(f"no answer within {timeout:g} s")
    return errors[0]


def describe(error: Exception) -> str:
    """`HTTP 404`, or the network's reason (`[Errno 111] Connection refused`)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    return str(getattr(error, "reason", None) or error)

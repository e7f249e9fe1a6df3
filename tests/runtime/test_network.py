"""resnet_jax.runtime.network: what a probe of a local server says, within its timeout."""

from __future__ import annotations

import socket
import urllib.error

from resnet_jax.runtime.network import describe, probe


def test_a_file_that_is_there_and_one_that_is_not(http_server):
    folder, base = http_server
    (folder / "here.bin").write_bytes(b"x" * 1000)
    assert probe(f"{base}/here.bin", timeout=5) is None
    error = probe(f"{base}/gone", timeout=5)
    assert isinstance(error, urllib.error.HTTPError) and describe(error) == "HTTP 404"


def test_nobody_listening_and_a_bad_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert "refused" in describe(probe(f"http://127.0.0.1:{port}/x", timeout=5)).lower()
    assert isinstance(probe("not a url", timeout=5), ValueError)


def test_a_server_that_never_answers_gives_a_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts the connection, never sends a byte
        error = probe(f"http://127.0.0.1:{listener.getsockname()[1]}/x", timeout=0.2)
    assert isinstance(error, TimeoutError) and describe(error) == "no answer within 0.2 s"

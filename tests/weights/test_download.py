"""resnet_jax.weights.download: torchvision's weights from a local HTTP server, checked, cached,
and found in torch hub's cache."""

from __future__ import annotations

import hashlib
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_jax.runtime.errors import UserError
from resnet_jax.weights import download
from resnet_jax.weights.download import pretrained_path, show_download_progress
from resnet_jax.weights.io import load_variables
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import flat, numpy_state_dict, randomised_torch_model


@pytest.fixture
def caches(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Point our cache and torch hub's at empty folders."""
    ours, hub = tmp_path / "cache", tmp_path / "torch_home" / "hub" / "checkpoints"
    monkeypatch.setenv("RESNET_JAX_CACHE", str(ours))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return ours, hub


def hashed_name(data: bytes, arch: str = "resnet18") -> str:
    return f"{arch}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_verify_reuse_and_load(caches, http_server, tmp_path):
    ours, _ = caches
    folder, base = http_server
    model = randomised_torch_model("resnet18")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    name = hashed_name(data)
    (folder / name).write_bytes(data)

    path = pretrained_path("resnet18", progress=False, url=f"{base}/{name}")
    assert path == ours / name and path.read_bytes() == data
    assert sorted(p.name for p in ours.iterdir()) == [name]  # no temp file left
    got, want = flat(load_variables(path)), flat(torch_to_flax(numpy_state_dict(model)))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    (folder / name).unlink()  # a second download would now fail with 404
    assert pretrained_path("resnet18", progress=False, url=f"{base}/{name}") == path


def test_download_bar_only_on_a_terminal_or_for_large_files(
    caches, http_server, monkeypatch, capsys
):
    folder, base = http_server
    data = b"weights" * 1000
    name = hashed_name(data)
    (folder / name).write_bytes(data)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    pretrained_path("resnet18", url=f"{base}/{name}", cache_dir=caches[0] / "a")
    assert capsys.readouterr().err == ""  # a small file into a log: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    pretrained_path("resnet18", url=f"{base}/{name}", cache_dir=caches[0] / "b")
    assert f"{name}: 100%" in capsys.readouterr().err


def test_explicit_cache_dir_and_damaged_cached_file_is_replaced(caches, http_server, tmp_path):
    folder, base = http_server
    data = b"weights" * 1000
    name = hashed_name(data)
    (folder / name).write_bytes(data)
    cache = tmp_path / "elsewhere"
    cache.mkdir()
    (cache / name).write_bytes(data[:100])  # an interrupted download from long ago
    path = pretrained_path("resnet18", cache_dir=cache, progress=False, url=f"{base}/{name}")
    assert path == cache / name and path.read_bytes() == data


def test_reuses_torch_hub_cache(caches):
    _, hub = caches
    data = b"from torch hub"
    name = hashed_name(data)
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data)
    url = f"http://127.0.0.1:{free_port()}/{name}"  # nothing listens: must not be needed
    assert pretrained_path("resnet18", progress=False, url=url) == hub / name


def test_hash_mismatch_deletes_the_download(caches, http_server):
    ours, _ = caches
    folder, base = http_server
    data = b"tampered"
    assert not hashlib.sha256(data).hexdigest().startswith("00000000")
    (folder / "resnet18-00000000.pth").write_bytes(data)
    with pytest.raises(UserError, match="sha256.*deleted.*--weights PATH"):
        pretrained_path("resnet18", progress=False, url=f"{base}/resnet18-00000000.pth")
    assert list(ours.iterdir()) == []


def test_http_error_names_url(caches, http_server):
    _, base = http_server
    url = f"{base}/resnet18-12345678.pth"
    with pytest.raises(UserError, match=f"{url}.*--weights PATH"):
        pretrained_path("resnet18", progress=False, url=url)


def test_unreachable_server_fails_fast(caches, monkeypatch):
    """One connection attempt, bounded by DOWNLOAD_TIMEOUT_S: no retries to wait through."""
    url = f"http://127.0.0.1:{free_port()}/resnet18-12345678.pth"
    attempts = []

    def urlopen(url, timeout):
        attempts.append(timeout)
        return real_urlopen(url, timeout=timeout)

    real_urlopen = download.urllib.request.urlopen
    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    with pytest.raises(UserError) as error:
        pretrained_path("resnet18", progress=False, url=url)
    assert attempts == [download.DOWNLOAD_TIMEOUT_S]
    message = str(error.value)
    assert url in message and "--weights PATH" in message and "\n" not in message


def test_unknown_arch_and_unhashed_name(caches):
    with pytest.raises(UserError, match="resnet18, resnet34"):
        pretrained_path("resnet19")
    with pytest.raises(UserError, match="sha256 prefix"):
        pretrained_path("resnet18", url="http://127.0.0.1:1/weights.pth")


def test_progress_shows_on_a_terminal_or_for_large_files(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not show_download_progress(None) and not show_download_progress(1 << 20)
    assert show_download_progress(download.LARGE_DOWNLOAD_BYTES)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_download_progress(None)

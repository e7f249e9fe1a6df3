"""torchvision's ImageNet weights on this machine: found in our cache or torch hub's, or
downloaded once from torchvision's URL and checked against the sha256 prefix in its name."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from resnet_jax.models.registry import get_architecture, sha256_prefix
from resnet_jax.runtime.cache import default_cache_dir, torch_hub_dir
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write

__all__ = ["DOWNLOAD_TIMEOUT_S", "LARGE_DOWNLOAD_BYTES", "download_checked", "pretrained_path",
           "show_download_progress"]  # fmt: skip

DOWNLOAD_TIMEOUT_S = 10  # per connection attempt and per read, so offline fails fast
LARGE_DOWNLOAD_BYTES = 64 << 20  # a bar is shown for these even when stderr is a log file
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def show_download_progress(total: int | None) -> bool:
    """Whether a download of `total` bytes shows a bar: on a terminal, or when it is large."""
    return sys.stderr.isatty() or (total or 0) >= LARGE_DOWNLOAD_BYTES


def pretrained_path(
    arch: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    url: str | None = None,
) -> Path:
    """Path of torchvision's ImageNet weights for `arch`, downloaded once and sha256-checked
    (with a bar on stderr if `progress` and it is a terminal or the file is large).

    Looks in `cache_dir` (default: `default_cache_dir()`) and torch hub's cache first. `url`
    replaces the registry's URL (a mirror, or a local server in tests); its file name must keep
    the `-<sha256 prefix>` part.
    """
    if url is None:
        weights = get_architecture(arch).weights
        if weights is None:
            raise get_architecture(arch).no_weights_error()
        url = weights.url
    filename = url.rsplit("/", 1)[-1]
    hash_prefix = sha256_prefix(filename)
    if hash_prefix is None:
        raise UserError(
            f"Cannot verify '{filename}': its name has no '-<sha256 prefix>' before the suffix."
        )
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / filename
    for candidate in (target, torch_hub_dir() / filename):
        if candidate.is_file() and _sha256(candidate).startswith(hash_prefix):
            return candidate
    download_checked(url, target, hash_prefix, progress)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_checked(url: str, target: Path, hash_prefix: str, progress: bool = True) -> None:
    """Stream `url` into a temporary file beside `target`; it becomes `target` only if its
    sha256 starts with `hash_prefix`. UserError, in one sentence, for every failure."""
    digest = hashlib.sha256()
    try:
        target.unlink(missing_ok=True)  # a damaged earlier download, if any
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                disable=not (progress and show_download_progress(total)),
            )  # fmt: skip
            with bar, atomic_write(target, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                if not digest.hexdigest().startswith(hash_prefix):
                    # Raising inside atomic_write deletes the temp file: nothing bad is kept.
                    raise UserError(
                        f"The file downloaded from {url} has sha256 {digest.hexdigest()[:12]}..., "
                        f"not {hash_prefix}..., so it was deleted; try again, or pass a local "
                        "file with --weights PATH."
                    )
    except _NETWORK_ERRORS as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"Could not download {url} ({reason}); check the connection, or pass a local file "
            "with --weights PATH."
        ) from e
    except OSError as e:  # not the network: the cache folder
        raise UserError(
            f"Could not write {target} ({e.strerror or e}); set RESNET_JAX_CACHE to a writable "
            "folder."
        ) from e

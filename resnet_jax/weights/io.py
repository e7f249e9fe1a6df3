"""Save and load Flax variables (.msgpack, .safetensors, .pth, or `hf:ORG/NAME` on the Hugging
Face hub, see hub.py) and fetch torchvision's ImageNet weights.

`.msgpack` keeps the Flax tree as is; `.safetensors` is written with torchvision's names and
layouts, so `torchvision.models.resnet50().load_state_dict(safetensors.torch.load_file(p))` works.
Both can carry a `metadata.ModelMetadata` (classes, eval transform, head layout).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from flax.core import unfreeze
from tqdm import tqdm

from resnet_jax.models.registry import ARCHITECTURES, get_architecture, sha256_prefix
from resnet_jax.models.scan import unstack_blocks
from resnet_jax.runtime.cache import default_cache_dir
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write, make_folder
from resnet_jax.weights.hub import (
    hub_metadata,
    hub_weights_path,
    is_hub_ref,
    show_download_progress,
)
from resnet_jax.weights.metadata import (
    METADATA_KEY,
    ModelMetadata,
    check_metadata,
    read_file_metadata,
)
from resnet_jax.weights.torch_format import load_torch_state_dict
from resnet_jax.weights.torch_names import (
    check_torch_shapes,
    flax_to_torch,
    head_of,
    num_classes_of,
    resolve_arch,
    torch_to_flax,
)

__all__ = [
    "WEIGHT_SUFFIXES",
    "WEIGHT_URLS",
    "convert_file",
    "convert_folder",
    "load_variables",
    "pretrained_path",
    "read_metadata",
    "save_variables",
    "torch_hub_dir",
]

# torchvision's IMAGENET1K_V1 weights by architecture (kept as a name; the registry holds them).
WEIGHT_URLS: dict[str, str] = {n: a.weights.url for n, a in ARCHITECTURES.items() if a.weights}
TORCH_SUFFIXES = (".pth", ".pt", ".th", ".safetensors")  # .th: the CIFAR ResNets' checkpoints
WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".msgpack")  # what load_variables reads
DOWNLOAD_TIMEOUT_S = 10  # per connection attempt and per read, so offline fails fast
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def save_variables(
    path: str | os.PathLike, variables: Any, metadata: ModelMetadata | None = None
) -> None:
    """Write variables atomically: `.msgpack` (the Flax tree) or `.safetensors` (torchvision
    names), with `metadata` if given (see `metadata.py` for where each format keeps it).
    Either way one entry per block (a scanned model's stacked blocks are unstacked)."""
    path = Path(path)
    suffix = path.suffix.lower()
    table = {} if metadata is None else metadata.to_strings()
    if suffix == ".msgpack":
        tree = unstack_blocks(jax.device_get(unfreeze(variables)))  # a copy: in_place is safe
        if table:
            tree = {METADATA_KEY: table, **tree}
        # in_place keeps the metadata first (a copy would sort the keys), so it reads quickly.
        data = serialization.msgpack_serialize(tree, in_place=True)
    elif suffix == ".safetensors":
        from safetensors.numpy import save

        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them shape [1]).
        tensors = {k: np.require(v, requirements="C") for k, v in flax_to_torch(variables).items()}
        data = save(tensors, metadata={"format": "pt", **table})
    else:
        raise UserError(f"Cannot save weights as {path}: use a .msgpack or .safetensors file name.")
    with atomic_write(path, "wb") as f:
        f.write(data)


def load_variables(path: str | os.PathLike) -> dict:
    """Read {'params', 'batch_stats'} from .msgpack, from a torchvision .safetensors/.pth/.pt
    (or a CIFAR ResNet's .th), or from `hf:ORG/NAME[@REVISION]` (its model.safetensors,
    downloaded once). One entry per block: `models.scan.stack_blocks` fits a scanned model.

    A .msgpack holding a whole Flax TrainState gives its params and batch_stats.
    """
    path = hub_weights_path(path) if is_hub_ref(path) else Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a weights file; give the file's path.")
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist; check the path.")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        # Names and shapes are checked against the architectures before any tensor is read.
        return torch_to_flax(load_torch_state_dict(path, check=check_torch_shapes))
    if suffix != ".msgpack":
        raise UserError(
            f"Cannot read weights from {path}: use a .msgpack, .safetensors, .pth, .pt or .th file."
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read {path} ({e.strerror or e}); check its permissions.") from e
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises assorted errors on damaged input
        raise UserError(
            f"{path} is damaged or not a Flax .msgpack file ({e}); save it again."
        ) from e
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
        raise UserError(f"{path} holds no Flax variables (no 'params' entry); check the file.")
    # A TrainState also holds step and opt_state; only the model's variables are wanted.
    variables = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    _check_tree(variables, path)
    return variables


def read_metadata(spec: str | os.PathLike) -> ModelMetadata | None:
    """The metadata of a weights file (None where it has none: .pth, files from elsewhere), read
    without its tensors; for `hf:ORG/NAME`, the architecture from the tensors and the transform
    from the repository's config.json."""
    return hub_metadata(spec) if is_hub_ref(spec) else read_file_metadata(spec)


def _check_tree(tree: dict, path: Path, where: str = "") -> None:
    """Refuse anything but nested dicts with string keys and array leaves, in one line."""
    for key, value in tree.items():
        if not isinstance(key, str):
            raise UserError(
                f"{path} has a non-string key {key!r} in '{where or '/'}'; check the file."
            )
        name = f"{where}/{key}" if where else key
        if isinstance(value, dict):
            _check_tree(value, path, name)
        elif not where or not isinstance(value, np.ndarray):
            raise UserError(
                f"{path} holds a value of type {type(value).__name__} at '{name}' where Flax "
                f"variables have {'an array' if where else 'a dict'}; check the file."
            )


def torch_hub_dir() -> Path:
    """Where torch.hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("TORCH_HOME") or Path(cache) / "torch") / "hub" / "checkpoints"


def _hash_prefix(filename: str) -> str:
    """`resnet18-f37072fd.pth` -> `f37072fd`: the part after the last '-' before the suffix."""
    prefix = sha256_prefix(filename)
    if prefix is None:
        raise UserError(
            f"Cannot verify '{filename}': its name has no '-<sha256 prefix>' before the suffix."
        )
    return prefix


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, hash_prefix: str, progress: bool) -> None:
    """Stream `url` into a temp file beside `target`; it becomes `target` only if the hash fits."""
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
    hash_prefix = _hash_prefix(filename)
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / filename
    for candidate in (target, torch_hub_dir() / filename):
        if candidate.is_file() and _sha256(candidate).startswith(hash_prefix):
            return candidate
    _download(url, target, hash_prefix, progress)
    return target


def convert_file(
    src: str | os.PathLike, dst: str | os.PathLike, arch: str | None = None
) -> tuple[str, int]:
    """Convert a weights file (.pth/.safetensors/.msgpack -> .msgpack/.safetensors), checking it;
    its metadata, if any, goes along.

    Returns the architecture and the number of parameters; `arch` makes a mismatch an error.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise UserError(f"Source and destination are the same file ({src}); choose another name.")
    variables = load_variables(src)
    arch = resolve_arch(variables, arch)
    metadata = read_metadata(src)
    if metadata is not None:
        check_metadata(metadata, arch, num_classes_of(variables), head_of(variables), src)
    save_variables(dst, variables, metadata)
    return arch, sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))


def convert_folder(
    src: str | os.PathLike, dst: str | os.PathLike, suffix: str, arch: str | None = None
) -> Iterator[tuple[Path, Path, tuple[str, int] | UserError]]:
    """Convert every weights file in folder `src` to `dst/<name><suffix>`, with a progress bar.

    Yields (source, destination, `convert_file`'s result or the UserError that stopped that
    file): one bad file does not stop the others.
    """
    src, dst = Path(src), Path(dst)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if not files:
        raise UserError(
            f"{src} holds no weights file ({', '.join(WEIGHT_SUFFIXES)}); give a folder of them "
            "or one file."
        )
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} is a file; give a folder to convert the folder {src} into.")
    make_folder(dst)
    written: dict[Path, Path] = {}  # destination -> the source converted into it
    for path in tqdm(files, desc="convert", unit="file", disable=None):
        target = dst / (path.stem + suffix)
        try:
            if target in written:  # r18.pth and r18.safetensors both give r18.msgpack
                raise UserError(
                    f"{path} would overwrite {target}, converted from {written[target]}; "
                    "convert it alone with another name."
                )
            yield path, target, convert_file(path, target, arch)
            written[target] = path
        except UserError as e:
            yield path, target, e

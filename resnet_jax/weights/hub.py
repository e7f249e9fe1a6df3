"""Weights on the Hugging Face hub: `hf:ORG/NAME[@REVISION]`, e.g. `hf:timm/resnet50.tv_in1k`.

timm publishes torchvision's ImageNet weights there as `model.safetensors` with torchvision's
names, beside a `config.json` whose `pretrained_cfg` gives the eval transform. Files go through
`huggingface_hub` (imported on first use), so its cache, `HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN` apply; the variables are read at each call.
Every failure of the hub or the network becomes one UserError sentence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import json
import logging
import math
import os
import re
import ssl
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.network import describe, probe
from resnet_jax.weights.download import show_download_progress
from resnet_jax.weights.metadata import ModelMetadata, read_file_metadata
from resnet_jax.weights.torch_names import arch_from_torch_shapes

__all__ = [
    "HUB_PREFIX",
    "HubRef",
    "hub_metadata",
    "hub_weights_path",
    "is_hub_ref",
]

HUB_PREFIX = "hf:"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TRUE = {"1", "on", "yes", "true"}
_CACHE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
_PROBED: dict[str, str | None] = {}  # endpoint -> why it was unreachable, None if it answered
_WARNED: set[tuple[HubRef, str]] = set()  # (ref, file) that was missing offline, said once


def is_hub_ref(spec: str | os.PathLike) -> bool:
    """Whether `spec` names weights on the hub (`hf:ORG/NAME`) rather than a file."""
    return os.fspath(spec).startswith(HUB_PREFIX)


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A repository on the hub and, optionally, a branch, tag or commit of it."""

    repo: str
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> HubRef:
        """`hf:ORG/NAME` or `hf:ORG/NAME@REVISION`; UserError for anything else."""
        text = os.fspath(spec)
        repo, _, revision = text.removeprefix(HUB_PREFIX).partition("@")
        if (
            not _REPO.fullmatch(repo)
            or repo.endswith((".", "-"))
            or ".." in repo
            or ("@" in text and not revision)
        ):
            raise UserError(
                f"'{text}' is not a Hugging Face repository; write hf:ORG/NAME or "
                "hf:ORG/NAME@REVISION, e.g. hf:timm/resnet50.tv_in1k."
            )
        return cls(repo, revision or None)

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo + (f"@{self.revision}" if self.revision else "")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, as set now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _progress_class() -> type:
    """A tqdm that decides for itself whether to show (see `show_download_progress`)."""
    from tqdm import tqdm

    class DownloadBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own bars take a name; tqdm does not
            quiet = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in _TRUE
            kwargs["disable"] = quiet or not show_download_progress(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    return DownloadBar


def _unreachable(endpoint: str) -> str | None:
    """Why the hub at `endpoint` cannot be reached (None if it answers at all), found within
    PROBE_TIMEOUT_S where huggingface_hub would retry for about 20 s; asked once a process."""
    if endpoint not in _PROBED:
        error = probe(endpoint)
        # Any HTTP answer means the hub is there; certificates are huggingface_hub's to check.
        answered = (
            error is None
            or isinstance(error, (urllib.error.HTTPError, ssl.SSLError))
            or isinstance(getattr(error, "reason", None), ssl.SSLError)
        )
        _PROBED[endpoint] = None if answered else describe(error)
    return _PROBED[endpoint]


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Keep huggingface_hub's retry warnings off stderr: what failed is said in one sentence."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fetch(ref: HubRef, filename: str, required: bool = True) -> Path | None:
    """The cached path of `filename` in `ref`, downloaded if needed; None if it does not exist
    and not `required`. Offline or unreachable, the cache answers. UserError for every failure,
    in one sentence."""
    import huggingface_hub

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT
    unreachable = None if _offline() else _unreachable(endpoint)
    kwargs: dict[str, Any] = {
        "revision": ref.revision,
        "cache_dir": _cache_dir(),
        "local_files_only": _offline() or unreachable is not None,
        "endpoint": endpoint,
    }
    if "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters:
        kwargs["tqdm_class"] = _progress_class()  # older releases always show their own bar
    if kwargs["local_files_only"] and not required:
        return _cached(ref, filename, kwargs["cache_dir"])
    try:
        with _quiet_hub_logs():
            return Path(huggingface_hub.hf_hub_download(ref.repo, filename, **kwargs))
    except Exception as e:
        kind = _failure_kind(e)
        if kind == "no such file" and not required:
            return None
        facts = {"ref": ref, "file": filename, "endpoint": endpoint, "instead": _INSTEAD,
                 "reason": unreachable or _reason(e), "strerror": getattr(e, "strerror", "")}  # fmt: skip
        raise UserError(_FAILURES[kind].format(**facts)) from e


def _cached(ref: HubRef, filename: str, cache_dir: str | None) -> Path | None:
    """`filename` of `ref` from the cache when the hub cannot be asked; None, with a warning
    (once), where the cache lacks it."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(
        ref.repo, filename, cache_dir=cache_dir, revision=ref.revision
    )
    if cached is None and (ref, filename) not in _WARNED:  # cached by another program?
        _WARNED.add((ref, filename))
        print(
            f"warning: {filename} of {ref} is not in the Hugging Face cache and the hub "
            "cannot be asked; the architecture's ImageNet eval transform is used.",
            file=sys.stderr,
        )
    return Path(cached) if isinstance(cached, str) else None  # not a str: the hub said none


_INSTEAD = f"download {WEIGHTS_FILE} from the repository and pass --weights PATH"
# What a failed download says, by kind (`_failure_kind`); formatted with `_fetch`'s facts.
_FAILURES = {
    "offline": "HF_HUB_OFFLINE is set and {file} of {ref} is not in the Hugging Face cache; "
    "unset HF_HUB_OFFLINE to download it, or {instead}.",
    "unreachable": "Cannot reach the Hugging Face hub at {endpoint} for {ref} ({reason}): "
    "connect, or check HF_ENDPOINT, or {instead}.",
    "gated": "{ref} is gated: accept its terms on the hub, then log in (hf auth login or "
    "HF_TOKEN).",
    "no such repository": "There is no repository {ref.repo} on the Hugging Face hub (or it is "
    "private); check the name, e.g. hf:timm/resnet50.tv_in1k, or log in for a private one.",
    "no such revision": "{ref.repo} has no revision '{ref.revision}' on the Hugging Face hub; "
    "give a branch, tag or commit it has, or drop @{ref.revision}.",
    "no such file": "{ref} has no {file}; use a repository of torchvision-named safetensors "
    "weights, such as hf:timm/resnet50.tv_in1k.",
    "refused": "The Hugging Face hub refused {file} of {ref} ({reason}); try again later, or "
    "{instead}.",
    "cache": "Cannot write {file} of {ref} to the Hugging Face cache ({strerror}); set HF_HOME "
    "to a writable folder with space.",
    "failed": "Downloading {file} of {ref} failed ({reason}); try again, or {instead}.",
}


def _failure_kind(error: Exception) -> str:
    """Which of `_FAILURES` an exception of `hf_hub_download` is, the most specific first."""
    from huggingface_hub import utils as hub_errors

    kinds = (  # a subclass before its base: LocalEntryNotFoundError is an EntryNotFoundError
        (hub_errors.LocalEntryNotFoundError, "offline" if _offline() else "unreachable"),
        (hub_errors.GatedRepoError, "gated"),
        (hub_errors.RepositoryNotFoundError, "no such repository"),
        (hub_errors.RevisionNotFoundError, "no such revision"),
        (hub_errors.EntryNotFoundError, "no such file"),
        (hub_errors.HfHubHTTPError, "refused"),
    )
    kind = next((kind for cls, kind in kinds if isinstance(error, cls)), "failed")
    if kind == "failed" and isinstance(error, OSError) and error.errno in _CACHE_ERRNOS:
        return "cache"
    return kind


def _reason(error: BaseException) -> str:
    """The first line of what went wrong, naming the deepest cause (e.g. ConnectError)."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = (str(error).strip().splitlines() or [""])[0][:120]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def hub_weights_path(spec: str | os.PathLike) -> Path:
    """The local (cached) `model.safetensors` of `hf:ORG/NAME[@REVISION]`, downloaded once with
    its config.json, so that `hub_metadata` works offline later."""
    ref = HubRef.parse(spec)
    path = _fetch(ref, WEIGHTS_FILE)
    _fetch(ref, CONFIG_FILE, required=False)
    return path


def hub_metadata(spec: str | os.PathLike) -> ModelMetadata | None:
    """What `hf:ORG/NAME` weights are: architecture, classes and head from the tensors' names
    and shapes, the eval transform from timm's config.json (the registry's without one).
    None for weights without a classification head."""
    ref = HubRef.parse(spec)
    weights = _fetch(ref, WEIGHTS_FILE)
    own = read_file_metadata(weights)  # a file written here and uploaded carries ours
    if own is not None:
        return own
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as e:  # any parse failure of a downloaded file means it is damaged
        raise UserError(
            f"{WEIGHTS_FILE} of {ref} is damaged ({_reason(e)}); delete it from the Hugging Face "
            "cache and try again."
        ) from e
    arch = arch_from_torch_shapes(shapes)
    head = "append" if "head.weight" in shapes else "replace"
    last = shapes.get("head.weight" if head == "append" else "fc.weight")
    if last is None:
        return None
    metadata = ModelMetadata.default(arch, last[0], head)
    config = _fetch(ref, CONFIG_FILE, required=False)
    if config is None:
        return metadata
    return dataclasses.replace(metadata, **_transform_fields(config, ref, metadata))


def _transform_fields(path: Path, ref: HubRef, default: ModelMetadata) -> dict[str, Any]:
    """ModelMetadata's image sizes, mean and std from timm's `pretrained_cfg`: the eval crop is
    the test size where given, resized first to floor(crop / crop_pct), as timm evaluates."""
    try:
        config = json.loads(path.read_text())
        cfg = config.get("pretrained_cfg", config)
        train = int(cfg["input_size"][-1])
        crop = int(cfg.get("test_input_size", cfg["input_size"])[-1])
        crop_pct = float(cfg.get("test_crop_pct", cfg.get("crop_pct", 0.875)))
        fields = {
            "image_size": train,
            "crop_size": crop,
            "resize_size": math.floor(crop / crop_pct),
            "mean": tuple(float(x) for x in cfg.get("mean", default.mean)),
            "std": tuple(float(x) for x in cfg.get("std", default.std)),
        }
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError) as e:
        raise UserError(
            f"The {CONFIG_FILE} of {ref} is not timm's ({type(e).__name__}: {e}); use a "
            f"repository whose {CONFIG_FILE} has a pretrained_cfg, or download {WEIGHTS_FILE} "
            "and pass --weights PATH."
        ) from None
    bad = [k for k in ("image_size", "crop_size", "resize_size") if fields[k] < 1]
    if bad or len(fields["mean"]) != 3 or len(fields["std"]) != 3 or min(fields["std"]) <= 0:
        raise UserError(
            f"The {CONFIG_FILE} of {ref} gives an impossible eval transform ({fields}); download "
            f"{WEIGHTS_FILE} and pass --weights PATH."
        )
    return fields

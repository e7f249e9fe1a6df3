"""What a weights file written here says about its model, so that it predicts as it was validated:
architecture, classes, head layout, training image size, the eval transform, and whether the
tensors are the trained weights or their moving average.

`.msgpack` files keep it as their first field, `metadata` (read without reading the tensors);
`.safetensors` files in their standard `__metadata__` header, which torch's loaders ignore. Both
hold the same string table (`ModelMetadata.to_strings`). `.pth` files and older files have none.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resnet_jax.models.factory import create_model
from resnet_jax.models.registry import ARCHITECTURES, IMAGENET_EVAL, EvalTransform, get_architecture
from resnet_jax.models.resnet import HEADS, ResNet
from resnet_jax.runtime.errors import UserError

__all__ = ["METADATA_KEY", "WEIGHTS", "ModelMetadata", "check_metadata", "read_file_metadata"]

METADATA_KEY = "metadata"  # the .msgpack field
_TEXT_FIELDS = ("arch", "head", "weights")  # stored as they are; every other field as JSON

# `ModelMetadata.weights`: which tensors a file holds.
WEIGHTS = {"raw": "the trained weights", "ema": "their exponential moving average (--model-ema)"}


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """A trained model's facts, written beside its tensors (see the module docstring)."""

    arch: str
    num_classes: int
    classes: tuple[str, ...] | None = None  # names in label order; None: not recorded
    image_size: int = 224  # the training crop size
    resize_size: int = 256  # eval: the shorter side is resized to this,
    crop_size: int = 224  # then centre-cropped to this
    mean: tuple[float, float, float] = IMAGENET_EVAL.mean
    std: tuple[float, float, float] = IMAGENET_EVAL.std
    head: str = "replace"  # a key of models.HEADS
    weights: str = "raw"  # a key of WEIGHTS

    @classmethod
    def default(cls, arch: str, num_classes: int, head: str = "replace") -> ModelMetadata:
        """What a file without metadata is taken to be: the architecture's eval transform from
        the registry (ImageNet's, resnext101_64x4d's resize 232, CIFAR's 32 px), no class
        names."""
        t = get_architecture(arch).transform
        return cls(arch, num_classes, None, t.crop_size, t.resize_size, t.crop_size, t.mean,
                   t.std, head)  # fmt: skip

    @property
    def transform(self) -> EvalTransform:
        """The eval transform these weights were validated with."""
        return EvalTransform(self.resize_size, self.crop_size, self.mean, self.std)

    def create_model(self, **kwargs: Any) -> ResNet:
        """The model these weights belong to (`kwargs`: other ResNet fields, such as dtype)."""
        return create_model(self.arch, num_classes=self.num_classes, head=self.head, **kwargs)

    def to_strings(self) -> dict[str, str]:
        """The string table stored in files: text fields as they are, the others as JSON."""
        table = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name in _TEXT_FIELDS:
                table[field.name] = value
            else:
                table[field.name] = json.dumps(list(value) if isinstance(value, tuple) else value)
        return table

    @classmethod
    def from_strings(cls, table: Mapping[str, Any], where: str | os.PathLike) -> ModelMetadata:
        """Parse and check `to_strings`'s table; other keys are ignored. UserError naming `where`
        for a missing or malformed field."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = table.get(field.name)
            if raw is None:
                continue
            if not isinstance(raw, str):
                raise _damaged(where, field.name, raw)
            try:
                value = raw if field.name in _TEXT_FIELDS else json.loads(raw)
            except ValueError:
                raise _damaged(where, field.name, raw) from None
            values[field.name] = tuple(value) if isinstance(value, list) else value
        for name in ("arch", "num_classes"):
            if name not in values:
                raise _damaged(where, name, None)
        metadata = cls(**values)
        metadata._check(where)
        return metadata

    def _check(self, where: str | os.PathLike) -> None:
        def positive_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x > 0

        def numbers(x: Any) -> bool:
            return (
                isinstance(x, tuple)
                and len(x) == 3
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in x)
            )

        problems = {
            "arch": self.arch not in ARCHITECTURES,
            "num_classes": not positive_int(self.num_classes),
            "classes": self.classes is not None
            and not (
                isinstance(self.classes, tuple)
                and len(self.classes) == self.num_classes
                and all(isinstance(c, str) for c in self.classes)
            ),
            "image_size": not positive_int(self.image_size),
            "resize_size": not positive_int(self.resize_size),
            "crop_size": not positive_int(self.crop_size),
            "mean": not numbers(self.mean),
            "std": not (numbers(self.std) and all(v > 0 for v in self.std)),
            "head": self.head not in HEADS,
            "weights": self.weights not in WEIGHTS,
        }
        for name, bad in problems.items():
            if bad:
                raise _damaged(where, name, self.to_strings().get(name))


def _damaged(where: str | os.PathLike, name: str, raw: Any) -> UserError:
    found = "is missing" if raw is None else f"is {str(raw)[:60]!r}"
    return UserError(
        f"The metadata of {where} is damaged ('{name}' {found}); write the file again with "
        "train.py or convert_weights.py."
    )


def _msgpack_table(path: Path) -> Any:
    """The `metadata` field of a .msgpack file, or None; it is the first field when present."""
    import msgpack

    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False)
        if unpacker.read_map_header() == 0 or unpacker.unpack() != METADATA_KEY:
            return None
        return unpacker.unpack()


def _safetensors_table(path: Path) -> Any:
    """The `__metadata__` header of a .safetensors file, or None."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return f.metadata()


def read_file_metadata(path: str | os.PathLike) -> ModelMetadata | None:
    """The metadata of a local weights file, or None where it has none (.pth, files from
    elsewhere or from before metadata was written). Reads only the metadata, not the tensors."""
    path = Path(path)
    suffix = path.suffix.lower()
    readers = {".msgpack": _msgpack_table, ".safetensors": _safetensors_table}
    if suffix not in readers or not path.is_file():
        return None
    try:
        table = readers[suffix](path)
    except Exception as e:  # any parse failure of an untrusted file means it is damaged
        raise UserError(
            f"{path} is damaged ({type(e).__name__}: {e}); download or save it again."
        ) from e
    # safetensors headers of other writers hold other keys ("format": "pt"): no metadata of ours.
    if not isinstance(table, Mapping) or "arch" not in table:
        return None
    return ModelMetadata.from_strings(table, path)


def check_metadata(
    metadata: ModelMetadata, arch: str, num_classes: int, head: str, where: str | os.PathLike
) -> None:
    """UserError unless the metadata describes the model that the tensors are."""
    have = (metadata.arch, metadata.num_classes, metadata.head)
    if have != (arch, num_classes, head):
        raise UserError(
            f"The metadata of {where} describes a {metadata.num_classes}-class {metadata.arch} "
            f"({metadata.head} head) but its tensors are a {num_classes}-class {arch} "
            f"({head} head); write the file again with train.py or convert_weights.py."
        )

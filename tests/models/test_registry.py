"""The architecture registry against torchvision's weight enums, and the README's table against it."""

from pathlib import Path

import pytest
import torchvision

from resnet_jax import UserError, create_model
from resnet_jax.models.registry import ARCHITECTURES, get_architecture, sha256_prefix

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_entry_matches_torchvisions_imagenet1k_v1_weights(name):
    arch = get_architecture(name)
    want = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    transform = want.transforms()
    assert arch.name == name
    assert arch.weights.url == want.url
    assert arch.weights.sha256_prefix == sha256_prefix(want.url.rsplit("/", 1)[-1])
    assert want.url.endswith(f"-{arch.weights.sha256_prefix}.pth")
    assert arch.weights.top1 == want.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert arch.num_params == want.meta["num_params"]
    t = arch.weights.transform
    assert [t.resize_size] == transform.resize_size and [t.crop_size] == transform.crop_size
    assert list(t.mean) == transform.mean and list(t.std) == transform.std
    assert transform.interpolation.value == "bilinear"  # what data.transforms resizes with


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_entry_structure_is_torchvisions(name):
    arch = get_architecture(name)
    model = torchvision.models.get_model(name)
    block = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}[type(model.layer1[0]).__name__]
    layers = tuple(len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4))
    assert arch.structure == (block, layers, model.groups, model.base_width)
    ours = create_model(name)
    assert (ours.layers, ours.groups, ours.width_per_group) == arch.structure[1:]


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(
        UserError, match=r"Unknown architecture 'resnet35'; choose one of: resnet18,"
    ):
        get_architecture("resnet35")


def readme_table() -> str:
    """The README's table of factories, as the registry says it must read."""
    lines = [
        "| factory | block | blocks per stage | groups x width | parameters | ImageNet top-1, % | eval resize / crop |",
        "|---|---|---|---|---:|---:|---|",
    ]  # fmt: skip
    for a in ARCHITECTURES.values():
        t = a.weights.transform
        lines.append(
            f"| `{a.name}` | {a.block} | {'-'.join(map(str, a.layers))} | "
            f"{a.groups} x {a.width_per_group} | {a.num_params:,} | {a.weights.top1:.3f} | "
            f"{t.resize_size} / {t.crop_size} |"
        )
    return "\n".join(lines) + "\n"


def test_readme_table_is_the_registry():
    table = readme_table()
    assert table in README.read_text(), "README.md's factory table should read:\n" + table

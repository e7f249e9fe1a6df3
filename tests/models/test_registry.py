"""The architecture registry against torchvision's weight enums and the paper's CIFAR-10 networks,
and the README's tables against it."""

from pathlib import Path

import pytest
import torchvision

from resnet_jax import UserError, create_model
from resnet_jax.models.registry import ARCHITECTURES, CIFAR_EVAL, get_architecture, sha256_prefix
from resnet_jax.weights.download import pretrained_path

README = Path(__file__).resolve().parents[2] / "README.md"
IMAGENET = [name for name, a in ARCHITECTURES.items() if a.stem == "imagenet"]
CIFAR = [name for name, a in ARCHITECTURES.items() if a.stem == "cifar"]
# The paper's Table 6 (He et al. 2016), in millions, with 10 classes and option A shortcuts.
PAPER_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


@pytest.mark.parametrize("name", IMAGENET)
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
    t = arch.transform
    assert [t.resize_size] == transform.resize_size and [t.crop_size] == transform.crop_size
    assert list(t.mean) == transform.mean and list(t.std) == transform.std
    assert transform.interpolation.value == "bilinear"  # what data.transforms resizes with


@pytest.mark.parametrize("name", IMAGENET)
def test_entry_structure_is_torchvisions(name):
    arch = get_architecture(name)
    model = torchvision.models.get_model(name)
    block = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}[type(model.layer1[0]).__name__]
    layers = tuple(len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4))
    planes = (64, 128, 256, 512)
    assert arch.structure == (
        block,
        layers,
        model.groups,
        model.base_width,
        planes,
        "imagenet",
        "B",
    )
    assert arch.residual and arch.num_classes == 1000
    ours = create_model(name)
    assert (ours.layers, ours.groups, ours.width_per_group) == arch.structure[1:4]


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_entries_are_the_papers_networks(name):
    arch = get_architecture(name)
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    n = (depth - 2) // 6
    assert arch.structure == ("basic", (n, n, n), 1, 64, (16, 32, 64), "cifar", "A")
    assert arch.residual == name.startswith("resnet")
    assert (arch.num_classes, arch.transform, arch.weights) == (10, CIFAR_EVAL, None)
    assert arch.transform.mean == (0.485, 0.456, 0.406)  # the public checkpoints' normalisation
    # conv1 + bn1 464, fc 650; per block 4,672 in layer1, 18,560 in layer2 and 73,984 in
    # layer3, whose first blocks (16 -> 32, 32 -> 64 channels) have 13,952 and 55,552.
    assert arch.num_params == 97_216 * n - 21_926
    paper = str(PAPER_PARAMS[depth])  # plain networks have their residual twins' counts
    assert f"{arch.num_params / 1e6:.{len(paper.split('.')[1])}f}" == paper


def test_architectures_without_weights_say_so_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match=r"^resnet56 has no published weights to download .*"
                       r"--weights PATH, or --weights none"):  # fmt: skip
        pretrained_path("resnet56", cache_dir=tmp_path)


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(
        UserError, match=r"Unknown architecture 'resnet35'; choose one of: resnet18,"
    ):
        get_architecture("resnet35")


def imagenet_table() -> str:
    """The README's table of the ImageNet factories, as the registry says it must read."""
    lines = [
        "| factory | block | blocks per stage | groups x width | parameters | ImageNet top-1, % | eval resize / crop |",
        "|---|---|---|---|---:|---:|---|",
    ]  # fmt: skip
    for a in map(get_architecture, IMAGENET):
        t = a.transform
        lines.append(
            f"| `{a.name}` | {a.block} | {'-'.join(map(str, a.layers))} | "
            f"{a.groups} x {a.width_per_group} | {a.num_params:,} | {a.weights.top1:.3f} | "
            f"{t.resize_size} / {t.crop_size} |"
        )
    return "\n".join(lines) + "\n"


def cifar_table() -> str:
    """The README's table of the CIFAR-10 factories, as the registry says it must read."""
    lines = [
        "| factory | layers | blocks per stage | planes | shortcuts | parameters (10 classes) |",
        "|---|---:|---|---|---|---:|",
    ]
    for a in map(get_architecture, CIFAR):
        shortcut = f"option {a.shortcut}" if a.residual else "none (plain)"
        lines.append(
            f"| `{a.name}` | {6 * a.layers[0] + 2} | {'-'.join(map(str, a.layers))} | "
            f"{'-'.join(map(str, a.planes))} | {shortcut} | {a.num_params:,} |"
        )
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("table", [imagenet_table, cifar_table])
def test_readme_tables_are_the_registry(table):
    text = table()
    assert text in README.read_text(), f"README.md's {table.__name__} should read:\n" + text

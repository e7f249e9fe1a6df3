"""What the tests share: torchvision references, comparisons with torch, TensorBoard's reader,
and .pth files written by hand the way old torch versions wrote them."""

from __future__ import annotations

import importlib.util
import pickle
import struct
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from flax import traverse_util
from PIL import Image

from resnet_jax.data.loader import Loader
from resnet_jax.models.resnet import ResNet
from resnet_jax.weights.torch_format import LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION
from resnet_jax.weights.torch_names import torch_to_flax

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A root entry script (`predict.py`, ...) as a module, to call its `main` in process."""
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomised_torch_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A torchvision model whose BatchNorm parameters and running statistics are all random.

    `resnext14_32x4d` is a one-block-per-stage grouped model used where depth would hurt.
    """
    torch.manual_seed(seed)
    if name == "resnext14_32x4d":
        resnet = torchvision.models.resnet
        model = resnet.ResNet(
            resnet.Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4, **kwargs
        )
    else:
        model = getattr(torchvision.models, name)(**kwargs)
    _randomise_batch_norm(model)
    return model


class TorchCifarBlock(torch.nn.Module):
    """A basic block of the paper's CIFAR-10 networks (He et al. 2016, section 4.2), written
    from its description: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. Where the
    shape changes, option "A" adds x subsampled by the stride with zero channels padded half
    before and half after (as Idelbayev's public checkpoints do), option "B" a 1x1 conv + BN
    (`downsample`, torchvision's name); `shortcut=None` is a plain block (no shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str | None):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra, self.shortcut = stride, planes - in_planes, shortcut
        self.changes_shape = stride != 1 or in_planes != planes
        if shortcut == "B" and self.changes_shape:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is None:
            return torch.relu(out)
        if self.changes_shape and self.shortcut == "B":
            x = self.downsample(x)
        elif self.changes_shape:
            half = self.extra // 2
            x = torch.nn.functional.pad(
                x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, half, self.extra - half)
            )
        return torch.relu(out + x)


class TorchCifarResNet(torch.nn.Module):
    """The paper's 6n+2-layer CIFAR-10 network in torch, named as the public checkpoints name
    it (`conv1`, `bn1`, `layer1.0.conv1`, ..., `linear`): a 3x3 16-channel stem, three stages of
    n blocks at 16, 32 and 64 planes (strides 1, 2, 2), global average pooling, `linear`."""

    def __init__(self, n: int, shortcut: str | None = "A", num_classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(TorchCifarBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            setattr(self, f"layer{stage}", torch.nn.Sequential(*blocks))
        self.linear = torch.nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


def randomised_cifar_model(
    name: str, seed: int = 0, shortcut: str | None = "A", num_classes: int = 10
) -> TorchCifarResNet:
    """resnetN / plainN of the paper in torch with random weights and BatchNorm statistics
    (plain networks ignore `shortcut`)."""
    torch.manual_seed(seed)
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    shortcut = shortcut if name.startswith("resnet") else None
    model = TorchCifarResNet((depth - 2) // 6, shortcut, num_classes)
    _randomise_batch_norm(model)
    return model


def _randomise_batch_norm(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def relative_error(got, want) -> float:
    """max |got - want| / max |want|: the error measure used for every comparison with torch."""
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_step(tmodel: torch.nn.Module, x: np.ndarray, labels: np.ndarray) -> dict:
    """torch's eval logits, then one train-mode forward and backward: logits, gradients and
    updated running statistics, with Flax names."""
    with torch.no_grad():
        eval_logits = tmodel.eval()(nchw(x)).numpy()
    logits = tmodel.train()(nchw(x))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {n: p.grad.numpy() for n, p in tmodel.named_parameters()}
    return {
        "eval_logits": eval_logits,
        "logits": logits.detach().numpy(),
        "batch_stats": torch_to_flax(numpy_state_dict(tmodel))["batch_stats"],
        "grads": torch_to_flax(grads)["params"],
    }


@partial(jax.jit, static_argnums=0)  # one compilation: op by op takes twice as long
def flax_step(model: ResNet, variables: dict, x: np.ndarray, labels: np.ndarray) -> dict:
    """What `torch_step` returns, from our model."""

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
        return loss, (logits, updates["batch_stats"])

    grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(variables["params"])
    eval_logits = model.apply(variables, x, train=False)
    return {
        "eval_logits": eval_logits,
        "logits": logits,
        "batch_stats": batch_stats,
        "grads": grads,
    }


def step_errors(got: dict, want: dict) -> dict[str, float]:
    """The relative error of every output, running statistic and gradient, by name."""
    errors = {}
    for part, tree in got.items():
        flat_want = dict(jax.tree_util.tree_leaves_with_path(want[part]))
        flat_got = jax.tree_util.tree_leaves_with_path(tree)
        assert len(flat_got) == len(flat_want), part
        for path, leaf in flat_got:
            errors[part + jax.tree_util.keystr(path)] = relative_error(leaf, flat_want[path])
    return errors


def tensorboard_series(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    for tag in tags["images"]:
        series[tag] = [(e.step, e.encoded_image_string) for e in events.Images(tag)]
    return series


class OldStorage:
    """A storage as torch 0.x pickled it: by persistent id, possibly as a view of another."""

    def __init__(self, key, numel, view=None):
        self.key, self.numel, self.view = key, numel, view


class OldTensor:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return torch._utils._rebuild_tensor, self.args  # the pre-0.4 rebuild function


def write_old_legacy(path: Path, obj, storages: dict[str, np.ndarray]) -> None:
    """Write a pre-1.6 file by hand, the way torch 0.3 did (no _rebuild_tensor_v2)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, OldStorage):
                return ("storage", torch.FloatStorage, o.key, "cpu", o.numel, o.view)
            return None

    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(sorted(storages), f, protocol=2)
        f.writelines(struct.pack("<q", v.size) + v.tobytes() for _, v in sorted(storages.items()))


def write_zip(path: Path, pickled: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")


def write_legacy(path: Path, pickled: bytes, *, in_header: bool = False) -> None:
    with open(path, "wb") as f:
        if in_header:  # the payload replaces the magic number
            f.write(pickled)
            return
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pickled)
        pickle.dump([], f, protocol=2)


def flat(tree) -> dict:
    """tree -> {'params/layer1_0/conv1/kernel': host array, ...}."""
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def noise_image(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_folder(root: Path, counts: dict[str, int], ext: str = ".png", seed: int = 0) -> Path:
    """root/<class>/<i><ext> noise images, a distinct seed per file."""
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise_image(seed + 100 * c + i).save(root / name / f"img{i}{ext}")
    return root


def make_train_val_folder(root: Path, classes: int = 3, train: int = 6, val: int = 2) -> Path:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg: noise with one bright channel per
    class, so the classes can be learnt in a few steps."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (44, 40, 3)).astype(np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def batches(loader: Loader, epoch: int = 0, start: int = 0) -> list[dict[str, np.ndarray]]:
    return list(loader.epoch(epoch, start))


def torch_resnet18(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """torchvision resnet18 with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.fc.weight.mul_(3.0)  # spread the logits so images differ in their top-1
    return model.eval()


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A smooth random image (blurred noise plus a colour ramp) of (width, height) `size`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4 + 8 * seed, 4 + 8 * seed, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    image.save(path)
    return path


def photo_like(width: int, height: int, seed: int, noise: float = 10.0) -> Image.Image:
    """Smooth colour fields plus fine noise, like a downscaled photo."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float64)
    pixels = smooth + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

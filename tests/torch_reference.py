"""torchvision reference models and comparison helpers shared by the tests."""

import numpy as np
import torch
import torchvision


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
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def relative_error(got, want) -> float:
    """max |got - want| / max |want|: the error measure used for every comparison with torch."""
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

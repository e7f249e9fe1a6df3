"""Inference speed of resnet_jax's Predictor against torchvision eager, in one run.

    python benchmarks/predict_latency.py [--archs resnet34 resnet50] [--repeats 5]

Prints batch-1 latency (median ms) and batch-64 throughput (images/s) for both, and the ratio.
Both get the same preprocessed 224x224 input; the JAX side includes the softmax and the copy
back to the host, as `Predictor.predict_arrays` returns it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import torchvision

from resnet_jax.inference import Predictor
from resnet_jax.models import create_model


def median_seconds(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, timed in turns so load from elsewhere hits all alike."""
    for fn in fns:
        fn(), fn()  # compile / allocate, then one more to settle caches
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench(arch: str, batch: int, repeats: int) -> list[float]:
    """[ours, torchvision] median seconds for one forward pass of `batch` images."""
    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3), dtype=np.float32)
    model = create_model(arch)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    predictor = Predictor(model, variables, [str(i) for i in range(1000)])

    net = getattr(torchvision.models, arch)().eval()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def torch_forward() -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(net(xt), dim=1).numpy()

    return median_seconds([lambda: predictor.predict_arrays(x), torch_forward], repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet34", "resnet50"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{'arch':10} {'measure':22} {'resnet_jax':>12} {'torchvision':>12} {'speed-up':>9}")
    for arch in args.archs:
        ours, theirs = bench(arch, 1, args.repeats * 4)
        print(f"{arch:10} {'batch-1 latency (ms)':22} {ours * 1e3:12.1f} {theirs * 1e3:12.1f} "
              f"{theirs / ours:8.2f}x")  # fmt: skip
        ours, theirs = bench(arch, args.batch, args.repeats)
        print(f"{arch:10} {f'batch-{args.batch} images/s':22} {args.batch / ours:12.1f} "
              f"{args.batch / theirs:12.1f} {theirs / ours:8.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

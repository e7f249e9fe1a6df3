"""The ResNet paper's degradation experiment (He et al. 2015, figure 6) on CIFAR-10 JPEGs.

    python benchmarks/degradation.py --data-dir ../shared/data/cifar10-jpg --steps 400 \
        --limit-val 1000 --zero-init-residual   # all four, one after another
    python benchmarks/degradation.py --data-dir DIR --archs plain20 plain56 --out /tmp/plain &
    python benchmarks/degradation.py --data-dir DIR --archs resnet20 resnet56 --out /tmp/res
    python benchmarks/degradation.py --plot-only /tmp/plain.json /tmp/res.json   # one figure
    python benchmarks/degradation.py --data-dir DIR --steps 4 --limit-train 64 --limit-val 64 \
        --batch-size 16 --log-every 2 --eval-every 2 --out /tmp/smoke      # smoke run
    python benchmarks/degradation.py --speed    # resnet20's train step against torch eager

plain20, plain56, resnet20 and resnet56 train one after another with the same recipe: the
cifar-paper values of `training/recipes.py` (SGD momentum 0.9, lr 0.1 at batch 128 and scaled
with `--batch-size`, weight decay 1e-4, pad-4 crop + flip at 32 px, evaluation at 32 px as is),
cut to `--steps` iterations with the lr divided by 10 at `--milestones` (default: at 50% and 75%
of the steps, where the paper's 32k and 48k fall in its 64k). The pieces are train.py's: the
Loaders with the recipe's TrainTransform, the optimizer and schedule built from a TrainConfig
(`training.run_setup`), and DataParallel's compiled train and eval steps. Training error is 1 -
accuracy over the training batches since the last point (train-mode BatchNorm, augmented
images), every `--log-every` iterations; test error is the validation error every `--eval-every`
iterations. The curves go to OUT.json (after each architecture) and the paper's figure to
OUT.png: a panel for the plain nets and one for the residual nets, dashed = training error,
solid = test error.

`--zero-init-residual` starts the residual nets' blocks as their shortcuts (torchvision's
option): without it resnet56 stays near chance for its first ~250 iterations at lr 0.1, which
a schedule of a few hundred iterations cannot spare. Plain nets have no shortcut to start as.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax.data.loader import Loader, open_datasets
from resnet_jax.data.sources import ImageFolderSource
from resnet_jax.models.factory import create_model
from resnet_jax.models.registry import get_architecture
from resnet_jax.runtime.cache import enable_compilation_cache
from resnet_jax.runtime.files import atomic_write
from resnet_jax.runtime.memory import keep_freed_memory
from resnet_jax.runtime.plotting import matplotlib_figure
from resnet_jax.training.config import TrainConfig, recipe_config, resolve
from resnet_jax.training.loop import evaluate, mean_metrics
from resnet_jax.training.optim import frozen_stages
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.recipes import RECIPES
from resnet_jax.training.run_setup import (
    make_run_optimizer,
    run_length,
    run_schedule,
    step_options,
    train_transform,
)
from resnet_jax.training.steps import create_state, zero_totals
from resnet_jax.training.transfer import initial_variables

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("plain20", "plain56", "resnet20", "resnet56")
COLORS = {20: "tab:orange", 56: "tab:red"}
SETTINGS = (
    "steps",
    "batch_size",
    "lr",
    "milestones",
    "warmup_steps",
    "zero_init_residual",
    "limit_train",
    "limit_val",
    "seed",
)


def paper_config(arch: str, args: argparse.Namespace) -> TrainConfig:
    """The cifar-paper recipe for `arch`, cut to `args.steps` with the milestones scaled."""
    return resolve(recipe_config(
        "cifar-paper", arch=arch, data_dir=args.data_dir, batch_size=args.batch_size,
        lr=args.lr, max_steps=args.steps, lr_milestones=tuple(args.milestones), seed=args.seed,
        workers=args.workers, output_dir=str(args.out), **warmup(args),
    ))  # fmt: skip


def warmup(args: argparse.Namespace) -> dict:
    """--warmup-steps N: the paper's lr / 10 start (resnet110's) for every net alike."""
    if args.warmup_steps is None:
        return {}
    return {"warmup_steps": args.warmup_steps, "warmup_method": "constant", "warmup_factor": 0.1}


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """--lr: the paper's scaled by --batch-size / its batch; --milestones: the paper's at the
    same fractions of --steps (32k and 48k of 64k)."""
    paper = RECIPES["cifar-paper"].values("resnet20")
    if args.lr is None:
        args.lr = paper["lr"] * args.batch_size / paper["batch_size"]
    if args.milestones is None:
        fractions = [m / paper["max_steps"] for m in paper["lr_milestones"]]
        args.milestones = sorted({round(f * args.steps) for f in fractions} - {0})
    return args


def subset(source: ImageFolderSource, limit: int | None, seed: int) -> ImageFolderSource:
    """`limit` examples of an image folder source drawn at random (all with None)."""
    if limit is None or limit >= len(source):
        return source
    keep = np.sort(np.random.default_rng(seed).permutation(len(source))[:limit])
    return ImageFolderSource([source.samples[i] for i in keep], source.classes)


def loaders(config: TrainConfig, args: argparse.Namespace) -> tuple[Loader, Loader, int]:
    """The training Loader (the recipe's per-image transform) and the validation Loader."""
    train, val, classes = open_datasets(config.data_dir)
    common = {"batch_size": config.batch_size, "seed": config.seed, "workers": config.workers,
              "processes": not config.worker_threads}  # fmt: skip
    train_loader = Loader(
        subset(train, args.limit_train, config.seed), train=True, image_size=config.image_size,
        transform=train_transform(config), reduced_decode=not config.full_decode, **common,
    )  # fmt: skip
    val_loader = Loader(
        subset(val, args.limit_val, config.seed), train=False, image_size=config.eval_crop,
        resize_size=config.eval_resize, **common,
    )  # fmt: skip
    return train_loader, val_loader, len(classes)


def endless(loader: Loader, dp: DataParallel) -> Iterator[dict]:
    """Training batches on the devices, epoch after epoch."""
    for epoch in itertools.count(1):
        with contextlib.closing(loader.epoch(epoch)) as batches:
            yield from dp.prefetch(batches)


def initial_state(
    config: TrainConfig,
    num_classes: int,
    steps_per_epoch: int,
    dp: DataParallel,
    zero_init_residual: bool = False,
) -> tuple[Any, Callable]:
    """The train state at step 0 and the compiled train step, as the trainer builds them from
    `config` (`zero_init_residual` for residual nets only: a plain block has no shortcut)."""
    length = run_length(config, steps_per_epoch)
    frozen = frozen_stages(config.freeze, config.head)
    zero = zero_init_residual and get_architecture(config.arch).residual
    model = create_model(config.arch, num_classes=num_classes, frozen_stages=frozen,
                         zero_init_residual=zero)  # fmt: skip
    tx = make_run_optimizer(config, run_schedule(config, length), frozen)
    variables, _ = initial_variables(model, config.arch, "none", config.seed)
    make_state = jax.jit(partial(create_state, model.apply, tx), out_shardings=dp.replicated)
    state = make_state(dp.replicate(variables))
    return state, dp.jit_train_step(step_options(config, length))


def error_percent(metrics: dict) -> float:
    return 100.0 * (1.0 - metrics["accuracy"])


def train_curves(arch: str, args: argparse.Namespace) -> dict:
    """Train `arch` for `args.steps` iterations: its training and test error curves."""
    config, dp = paper_config(arch, args), DataParallel()
    train_loader, val_loader, num_classes = loaders(config, args)
    state, train_step = initial_state(
        config, num_classes, len(train_loader), dp, args.zero_init_residual
    )
    eval_step = dp.jit_eval_step(get_architecture(arch).transform)

    def test_error(state) -> float:
        batches = dp.prefetch(val_loader.epoch(0))
        found = evaluate(eval_step, state, batches, len(val_loader), num_classes, dp, "val")
        return error_percent(found)

    curves = {"train": [], "test": [[0, test_error(state)]]}
    totals, start = dp.replicate(zero_totals()), time.perf_counter()
    with contextlib.closing(endless(train_loader, dp)) as batches:
        for i, batch in enumerate(itertools.islice(batches, config.max_steps), start=1):
            state, totals = train_step(state, batch, totals)
            if i == 1:
                compiled = time.perf_counter() - start
            last = i == config.max_steps
            if i % args.log_every == 0 or last:
                curves["train"].append([i, error_percent(mean_metrics(totals))])
                totals = dp.replicate(zero_totals())
            if i % args.eval_every == 0 or last:
                curves["test"].append([i, test_error(state)])
            if i % args.log_every == 0 or last:
                (_, train), (at, test) = curves["train"][-1], curves["test"][-1]
                print(f"{arch} iter {i}/{config.max_steps}: train error {train:.1f}%, test "
                      f"error {test:.1f}% (iter {at}), {time.perf_counter() - start:.0f} s",
                      flush=True)  # fmt: skip
    train_loader.close()
    val_loader.close()
    seconds = time.perf_counter() - start
    return {**curves, "seconds": seconds, "first_step_seconds": compiled}


def draw(result: dict, png: Path) -> None:
    """The paper's figure 6: plain nets left, residual nets right; dashed = training error,
    solid = test error, per iteration."""
    figure = matplotlib_figure("the degradation figure")(figsize=(9, 3.6), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for ax, family, title in zip(panels, ("plain", "resnet"), ("plain", "ResNet")):
        for arch, curve in result["curves"].items():
            if not arch.startswith(family):
                continue
            depth = int(arch.removeprefix(family))
            for kind, style in (("train", "--"), ("test", "-")):
                x, y = np.asarray(curve[kind]).T
                label = f"{title}-{depth}" if kind == "test" else None
                ax.plot(x, y, style, color=COLORS.get(depth), label=label, linewidth=1.2)
        zero = family == "resnet" and result.get("zero_init_residual")
        label = f"{title}, zero-init residual" if zero else title
        ax.set(title=label, xlabel="iterations")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    figure.suptitle("dashed: training error, solid: test error", fontsize="medium")
    panels[0].set_ylabel("error (%)")
    panels[0].set_ylim(0, min(100, 5 + max(
        max(p[1] for p in c["train"][1:] + c["test"][1:]) for c in result["curves"].values()
    )))  # fmt: skip
    figure.savefig(png, dpi=90)


def merge(results: list[dict]) -> dict:
    """One result of runs with the same settings, e.g. the plain and the residual pair run in
    two processes at once."""
    first = results[0]
    for other in results[1:]:
        shared = shaping(other) & shaping(first)
        differ = [k for k in SETTINGS if k in shared and other.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"error: the runs differ in {', '.join(differ)}; merge runs with "
                             "the same settings only.")  # fmt: skip
    if len(results) == 1:
        return first
    curves = {arch: c for r in results for arch, c in r["curves"].items()}
    per_run = {k: [r.get(k) for r in results] for k in ("command", "seconds")}
    zero = any(r.get("zero_init_residual") for r in results)
    return {**first, **per_run, "zero_init_residual": zero, "curves": curves}


def shaping(result: dict) -> set[str]:
    """The SETTINGS that shape `result`'s curves: `zero_init_residual` only with a residual net."""
    residual = any(get_architecture(arch).residual for arch in result["curves"])
    return set(SETTINGS) if residual else set(SETTINGS) - {"zero_init_residual"}


def write_json(result: dict, path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump(result, f, indent=1)


# Ours (malloc set up as train.py does), torch eager NCHW and channels_last, and both torch
# sides again with our malloc settings (benchmarks/speed.py's rows).
SPEED_SIDES = ("ours", "torch", "torch-cl", "torch+kept", "torch-cl+kept")


def fixed_batch(batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 32 px images and CIFAR-10 labels, the same for every side."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (batch_size, 32, 32, 3), np.uint8), rng.integers(0, 10, batch_size)


def our_step(args: argparse.Namespace) -> Callable[[], None]:
    """resnet20's train step as train.py runs it with the recipe."""
    enable_compilation_cache()
    images, labels = fixed_batch(args.batch_size)
    dp = DataParallel()
    state, step = initial_state(paper_config("resnet20", args), 10, 1000, dp)
    batch = dp.shard({"image": images, "label": labels.astype(np.int32),
                      "mask": np.ones(len(labels), bool)})  # fmt: skip
    holder, totals = [state], dp.replicate(zero_totals())

    def run() -> None:
        holder[0], new_totals = step(holder[0], batch, totals)
        new_totals["count"].block_until_ready()

    return run


def torch_step(args: argparse.Namespace, channels_last: bool) -> Callable[[], None]:
    """The torch reference of resnet20 (tests.helpers) eager, with the recipe's SGD."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.helpers import TorchCifarResNet

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many threads as JAX has cores
    _, labels = fixed_batch(args.batch_size)
    net, x = TorchCifarResNet(3, "A").train(), torch.randn(len(labels), 3, 32, 32)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels)
    opt = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)

    def run() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return run


def speed_worker(side: str, args: argparse.Namespace) -> None:
    """In a fresh process: the median seconds of `side`'s step after two warm-up steps."""
    if side == "ours" or side.endswith("+kept"):
        keep_freed_memory()  # as train.py does
    run = our_step(args) if side == "ours" else torch_step(args, side.startswith("torch-cl"))
    for _ in range(2):
        run()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times)}))


def speed(args: argparse.Namespace) -> None:
    """images/s of resnet20's train step, each side in fresh processes of its own, the sides
    alternating (`--rounds` processes each), as benchmarks/speed.py measures torchvision's."""
    times: dict[str, list[float]] = {side: [] for side in SPEED_SIDES}
    for _ in range(args.rounds):
        for side in SPEED_SIDES:
            cmd = [sys.executable, __file__, "--speed-worker", side, "--repeats", str(args.repeats),
                   "--batch-size", str(args.batch_size)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times[side].append(json.loads(out.strip().splitlines()[-1])["step_s"])
            print(f"{side}: {args.batch_size / times[side][-1]:.1f} images/s", flush=True)
    ips = {side: args.batch_size / statistics.median(t) for side, t in times.items()}
    print(f"resnet20 train step, batch {args.batch_size}, 32 px, {len(os.sched_getaffinity(0))} "
          f"cores, median of {args.repeats} steps x {args.rounds} processes per side; images/s "
          "(ours / theirs: > 1 means ours is faster):")  # fmt: skip
    for side, value in ips.items():
        each = ", ".join(f"{args.batch_size / t:.1f}" for t in times[side])
        print(f"  {side:14} {value:7.1f}  {ips['ours'] / value:5.2f}x  (processes: {each})")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpg")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--steps", type=int, default=400, help="iterations per architecture")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, help="default: the paper's 0.1 scaled by --batch-size / 128")
    p.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        help="lr / 10 at these iterations "
        "(default: 50%% and 75%% of --steps, the paper's 32k and 48k of 64k)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        help="every net starts at lr / 10 for this many iterations, as the paper's resnet110 "
        "(default: the recipe's, none for these depths)",
    )
    p.add_argument(
        "--zero-init-residual",
        action="store_true",
        help="residual nets start each block's last BatchNorm scale at 0, so that every block "
        "starts as its shortcut (torchvision's option; plain nets are unchanged)",
    )
    p.add_argument("--log-every", type=int, default=10, help="iterations per training error point")
    p.add_argument("--eval-every", type=int, default=50, help="iterations per test error point")
    p.add_argument("--limit-train", type=int, help="train on this many images drawn at random")
    p.add_argument("--limit-val", type=int, help="test on this many images drawn at random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="decoding workers (0: one per core)")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/figures/degradation",
        help="OUT.json and OUT.png are written",
    )
    p.add_argument(
        "--plot-only",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="draw the curves of these runs (same settings) into OUT.json and OUT.png",
    )
    p.add_argument("--speed", action="store_true", help="resnet20's train step against torch")
    p.add_argument("--repeats", type=int, default=10, help="--speed: timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="--speed: processes per side")
    p.add_argument("--speed-worker", choices=SPEED_SIDES, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = with_defaults(parse_args())
    if args.speed_worker:
        return speed_worker(args.speed_worker, args)
    if args.speed:
        return speed(args)
    if args.plot_only:
        result = merge([json.loads(path.read_text()) for path in args.plot_only])
        write_json(result, args.out.with_suffix(".json"))
        return draw(result, args.out.with_suffix(".png"))

    enable_compilation_cache()
    result = {"command": " ".join(sys.argv), "recipe": "cifar-paper", "curves": {}}
    result |= {k: getattr(args, k) for k in SETTINGS}
    json_path, start = args.out.with_suffix(".json"), time.perf_counter()
    for arch in args.archs:
        result["curves"][arch] = train_curves(arch, args)
        result["seconds"] = time.perf_counter() - start
        write_json(result, json_path)
    draw(result, args.out.with_suffix(".png"))
    print(f"{json_path} and {args.out.with_suffix('.png')} written "
          f"({result['seconds'] / 60:.1f} min)")  # fmt: skip


if __name__ == "__main__":
    main()

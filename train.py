"""Train a ResNet on an image folder or a tfds dataset: `python train.py --arch resnet34`.

With no other flags it does what the original PyTorch script did: tf_flowers, torchvision's
ImageNet weights with a new 5-class head, Adam 1e-4, batch 16, 3 epochs at 224 px.
"""

from __future__ import annotations

import argparse
import sys

from resnet_jax.errors import UserError
from resnet_jax.models import ARCHS
from resnet_jax.trainer import TrainConfig, train

D = TrainConfig()
EPILOG = """\
outputs (in --output-dir, default runs/ARCH): checkpoints/ (orbax: the latest and the best
epoch, for --resume), best.msgpack (best validation accuracy; for predict.py --weights),
class_indices.json, metrics.jsonl (one JSON line per epoch), training_curve.png.

Compiled steps are cached in $RESNET_JAX_CACHE/jax (default ~/.cache/resnet_jax/jax) so that
a second start skips compilation; JAX_COMPILATION_CACHE_DIR moves it ('' turns it off).

examples:
  python train.py --arch resnet34                       # the seed: tf_flowers, ImageNet weights
  python train.py --arch resnet50 --data-dir ~/pets --freeze backbone --epochs 5
  python train.py --arch resnet18 --weights none --optimizer sgd --lr 0.1 --schedule cosine
  python train.py --arch resnet50 --synthetic 20 --batch-size 256 --dtype bfloat16
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of `train.py`, one per `TrainConfig` field."""
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add(
        "--arch",
        default=D.arch,
        metavar="ARCH",
        help=f"one of: {', '.join(ARCHS)} (default: %(default)s)",
    )
    add(
        "--data-dir",
        metavar="ROOT",
        help="an image folder: ROOT/train/<class>/*.jpg with ROOT/val/<class>/*.jpg, or "
        "ROOT/<class>/*.jpg split by --val-fraction (default: --dataset from tfds)",
    )
    add(
        "--dataset",
        default=D.dataset,
        help="tensorflow-datasets name used without --data-dir (default: %(default)s)",
    )
    add(
        "--val-fraction",
        type=float,
        default=D.val_fraction,
        help="share of each class held out for validation when there is no val split "
        "(default: %(default)s)",
    )
    add(
        "--weights",
        metavar="imagenet|none|PATH",
        help="torchvision's ImageNet weights (downloaded once, sha256-checked), none (random "
        "init), or a .pth/.safetensors/.msgpack file; a head of another size is replaced by a "
        "new one for the classes of the data (default: imagenet; none with --synthetic)",
    )
    add(
        "--freeze",
        default=D.freeze,
        choices=["none", "backbone", "layer1", "layer2", "layer3"],
        help="none: train everything; backbone: train only the new head (fc); layerK: freeze "
        "the stem and layer1..layerK, train layer(K+1) on. Frozen parts get no update and no "
        "weight decay, and their BatchNorm uses its running statistics (default: %(default)s)",
    )
    add(
        "--optimizer",
        default=D.optimizer,
        choices=["adam", "adamw", "sgd"],
        help="adam (weight decay added to the gradient, as torch.optim.Adam), adamw (decoupled "
        "decay) or sgd (momentum 0.9) (default: %(default)s)",
    )
    add("--lr", type=float, default=D.lr, help="peak learning rate (default: %(default)s)")
    add("--weight-decay", type=float, help="weight decay (default: torch's: 0, or 0.01 for adamw)")
    add(
        "--schedule",
        default=D.schedule,
        choices=["constant", "cosine"],
        help="learning rate after the warmup: constant, or a cosine decay to 0 at the last "
        "step (default: %(default)s)",
    )
    add(
        "--warmup-epochs",
        type=float,
        default=D.warmup_epochs,
        help="linear warmup from 0 over this many (possibly fractional) epochs (default: %(default)s)",
    )
    add(
        "--label-smoothing",
        type=float,
        default=D.label_smoothing,
        help="label smoothing of the training loss (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=int,
        default=D.batch_size,
        help="global batch size, split over all devices and processes (default: %(default)s)",
    )
    add("--epochs", type=int, default=D.epochs, help="epochs to train (default: %(default)s)")
    add(
        "--image-size",
        type=int,
        default=D.image_size,
        help="training crop size in pixels (default: %(default)s)",
    )
    add(
        "--dtype",
        default=D.dtype,
        choices=["float32", "bfloat16"],
        help="compute dtype; parameters and BatchNorm statistics stay float32 (default: %(default)s)",
    )
    add(
        "--workers",
        type=int,
        default=D.workers,
        help="image decoding threads per process; 0: one per CPU core (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=D.seed,
        help="seeds the new head, the data order and the augmentation (default: %(default)s)",
    )
    add("--output-dir", metavar="DIR", help="where the outputs go (default: runs/ARCH)")
    add(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its latest checkpoint; pass the same flags "
        "(--epochs may grow): the result equals an uninterrupted run",
    )
    add(
        "--synthetic",
        type=int,
        nargs="?",
        const=50,
        default=D.synthetic,
        metavar="STEPS",
        help="measure throughput: random images made on the device, STEPS steps per epoch "
        "(50 if omitted), 1000 classes, no data loading, no validation, no checkpoints",
    )
    add(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="multi-host: process 0's address (also $JAX_COORDINATOR_ADDRESS; SLURM and Open "
        "MPI jobs are detected by JAX)",
    )
    add("--num-processes", type=int, help="multi-host: the number of processes")
    add("--process-id", type=int, help="multi-host: this process's index, 0..N-1")
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run `train.py`; user errors print one line on stderr and return 1."""
    args = parse_args(argv)
    try:
        train(TrainConfig(**vars(args)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted; continue with the same command plus --resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`train.py` / `resnet-jax-train`: train a ResNet on an image folder or a tfds dataset.

With no other flags it does what the original PyTorch script did: tf_flowers, torchvision's
ImageNet weights with a new 5-class head, Adam 1e-4, batch 16, 3 epochs at 224 px.
"""

from __future__ import annotations

import argparse
import sys

from resnet_jax.cli import parser_for, run
from resnet_jax.training.config import TrainConfig
from resnet_jax.training.recipes import RECIPES

__all__ = ["main", "parse_args"]

EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

EPILOG = """\
outputs (in --output-dir, default runs/ARCH): checkpoints/ (orbax: the latest and the best
epoch, for --resume), best.msgpack (best validation accuracy; for predict.py --weights),
class_indices.json, metrics.jsonl (one JSON line per epoch), tensorboard/ (event files: run
tensorboard --logdir runs/), training_curve.png, confusion_matrix.png (the best epoch's).

Compiled steps are cached in $RESNET_JAX_CACHE/jax (default ~/.cache/resnet_jax/jax) so that
a second start skips compilation; JAX_COMPILATION_CACHE_DIR moves it ('' turns it off).

examples:
  python train.py --arch resnet34                       # the original: tf_flowers, ImageNet weights
  python train.py --arch resnet50 --data-dir ~/pets --freeze backbone --epochs 5
  python train.py --arch resnet50 --data-dir ~/pets --head append --freeze backbone
  python train.py --arch resnet18 --weights none --optimizer sgd --lr 0.1 --schedule cosine
  python train.py --arch resnet50 --synthetic 20 --batch-size 256 --dtype bfloat16
"""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The flags of `train.py`, one per `TrainConfig` field; `--recipe` first sets the
    recipe's values as the defaults, so that flags given explicitly win."""
    parser = parser_for(
        TrainConfig,
        description=__doc__.split("\n", 2)[2],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    first = parser.parse_args(argv)
    if first.recipe is not None:
        parser.set_defaults(**RECIPES[first.recipe].values(first.arch))
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Run `train.py`; user errors print one line on stderr and return 1."""
    config = parse_args(argv)

    def command() -> int:
        from resnet_jax.training.trainer import train

        train(config)
        return 0

    sizes = (
        f"training {config.arch} at --batch-size {config.batch_size} and --image-size "
        f"{config.image_size}; lower either (or split batches with --accumulate-steps)"
    )
    try:
        return run(command, sizes, program=argv is None)
    except KeyboardInterrupt:
        print("Interrupted; continue with the same command plus --resume.", file=sys.stderr)
        return EXIT_INTERRUPTED

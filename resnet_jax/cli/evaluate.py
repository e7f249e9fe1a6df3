"""`evaluate.py` / `resnet-jax-eval`: score a weights file on a labelled image set.

Top-1 and top-5 accuracy, the mean cross-entropy, per-class accuracy and the confusion matrix,
with the eval transform the weights were validated with (from their metadata).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from resnet_jax.cli import parser_for, report_skipped, run
from resnet_jax.inference.evaluate import EvalConfig

__all__ = ["main", "parse_args"]

EPILOG = """\
The result is one line on stdout (--json: a JSON document); the progress bar and skipped
images go to stderr. Exit status: 0 all images scored, 1 error, 2 some unreadable images were
skipped (and left out of every number).

examples:
  python evaluate.py --weights runs/resnet18/best.msgpack --data-dir ~/flowers
  python evaluate.py --weights resnet50-0676ba61.pth --data-dir ~/imagenet --tta flip
  python evaluate.py --weights hf:timm/resnet50.tv_in1k --data-dir ~/imagenet/val --json
  python evaluate.py --weights best.msgpack --dataset tf_flowers --output per_class.csv
"""


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """The flags of `evaluate.py`, one per `EvalConfig` field."""
    parser = parser_for(
        EvalConfig,
        description=__doc__.split("\n", 2)[2],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return EvalConfig(**vars(parser.parse_args(argv)))


def evaluate(config: EvalConfig) -> int:
    """What `evaluate.py` does; returns the exit status (0, or EXIT_SKIPPED if images were
    skipped). Raises UserError for anything that stops the run."""
    from resnet_jax.inference import eval_result as show
    from resnet_jax.inference.evaluate import evaluate as score
    from resnet_jax.inference.output import output_format
    from resnet_jax.runtime.cache import enable_compilation_cache
    from resnet_jax.runtime.errors import UserError

    if config.output is not None:  # before the slow part
        output_format(config.output)
    if config.confusion_png is not None:
        if Path(config.confusion_png).suffix.lower() != ".png":
            raise UserError(f"--confusion-png {config.confusion_png}: use a name ending in .png.")
        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--confusion-png needs matplotlib; install it: pip install matplotlib.")

    enable_compilation_cache()  # a second run with the same batch shape skips compilation
    result = score(config)
    print(json.dumps(result.to_dict()) if config.json else result.summary())  # one line
    if config.output is not None:
        show.write_result(config.output, result)
    if config.confusion_png is not None:
        show.write_confusion_png(config.confusion_png, result)
    return report_skipped(result.skipped, result.images + result.skipped)


def main(argv: list[str] | None = None) -> int:
    """Run `evaluate.py`: 0 all scored, 1 a user error (one line), 2 some images skipped."""
    config = parse_args(argv)
    sizes = f"evaluating at --batch-size {config.batch_size}; lower it (or --crop)"
    return run(lambda: evaluate(config), sizes, program=argv is None)

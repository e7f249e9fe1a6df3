"""Classify images with a trained or converted ResNet: `python predict.py IMAGE --weights W`."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Predict the class of images (files or folders) with ResNet weights.",
        epilog="Exit status: 0 all predicted, 1 error, 2 some unreadable images were skipped.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    parser.add_argument(
        "--weights",
        required=True,
        help=".msgpack from train.py/convert_weights.py, or .pth/.safetensors",
    )
    parser.add_argument(
        "--class-indices", help="class names (default: class_indices.json beside the weights)"
    )
    parser.add_argument("--arch", help="architecture, e.g. resnet50 (default: from the weights)")
    parser.add_argument(
        "--top-k", type=int, help="show the k most probable classes (default: all up to 10, else 5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--plot", action="store_true", help="show the images with their top class")
    parser.add_argument(
        "--save-plot", metavar="FILE", help="write that figure to FILE (.png, .pdf)"
    )
    parser.add_argument(
        "--output", metavar="FILE", help="also write the results to FILE.csv or FILE.json"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from resnet_jax.errors import UserError  # after parsing, so --help does not wait for JAX
    from resnet_jax.inference import predict_cli

    try:
        return predict_cli(
            args.images,
            args.weights,
            class_indices=args.class_indices,
            arch=args.arch,
            top_k=args.top_k,
            json_output=args.json,
            plot_images=args.plot,
            save_plot=args.save_plot,
            output=args.output,
            batch_size=args.batch_size,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

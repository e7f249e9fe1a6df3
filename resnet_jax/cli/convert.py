"""`convert_weights.py` / `resnet-jax-convert`: convert ResNet weights between formats, no torch.

SRC: a torchvision .pth/.pt, a .safetensors, a .msgpack, or hf:ORG/NAME on the Hugging Face hub
(its eval transform goes into DST's metadata); DST: .msgpack (for train.py and predict.py) or
.safetensors (torchvision names, for going back to PyTorch). SRC may also be a folder: every
weights file in it is converted into the folder DST, in the format `--format` names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnet_jax.cli import run

__all__ = ["EXIT_SOME_FAILED", "main"]

EXIT_SOME_FAILED = 2  # a folder was converted, but some of its files could not be
FORMATS = (".msgpack", ".safetensors")


def main(argv: list[str] | None = None) -> int:
    """Convert SRC to DST and print the architecture and parameter count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0].split(": ", 1)[1])
    parser.add_argument(
        "src", help="weights to read (.pth, .pt, .safetensors, .msgpack, hf:ORG/NAME)"
    )
    parser.add_argument(
        "dst", help="file to write (.msgpack or .safetensors), or a folder when SRC is one"
    )
    parser.add_argument("--arch", help="expected architecture, e.g. resnet34 (default: detect)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=".msgpack",
        help="what a folder's files become (default .msgpack); a file's DST suffix says it",
    )
    args = parser.parse_args(argv)

    def command() -> int:
        from resnet_jax.weights.conversion import convert_file, convert_folder

        if not Path(args.src).is_dir():
            results = [(args.src, args.dst, convert_file(args.src, args.dst, args.arch))]
        else:
            results = convert_folder(args.src, args.dst, args.format, args.arch)
        failed = 0
        for src, dst, result in results:
            if isinstance(result, Exception):
                failed += 1
                print(f"error: {result}", file=sys.stderr)
            else:
                print(f"{src} -> {dst}: {result[0]}, {result[1]:,} parameters")
        return EXIT_SOME_FAILED if failed else 0

    return run(command, f"converting {args.src}; close other programs", program=argv is None)

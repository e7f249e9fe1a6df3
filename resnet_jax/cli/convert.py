"""`convert_weights.py` / `resnet-jax-convert`: convert ResNet weights between formats, no torch.

SRC: a torchvision .pth/.pt, a .safetensors, a .msgpack, or hf:ORG/NAME on the Hugging Face hub
(its eval transform goes into DST's metadata); DST: .msgpack (for train.py and predict.py) or
.safetensors (torchvision names, for going back to PyTorch).
"""

from __future__ import annotations

import argparse

from resnet_jax.cli import run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Convert SRC to DST and print the architecture and parameter count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0].split(": ", 1)[1])
    parser.add_argument(
        "src", help="weights to read (.pth, .pt, .safetensors, .msgpack, hf:ORG/NAME)"
    )
    parser.add_argument("dst", help="file to write (.msgpack or .safetensors)")
    parser.add_argument("--arch", help="expected architecture, e.g. resnet34 (default: detect)")
    args = parser.parse_args(argv)

    def command() -> int:
        from resnet_jax.weights import convert_file

        arch, n_params = convert_file(args.src, args.dst, args.arch)
        print(f"{args.src} -> {args.dst}: {arch}, {n_params:,} parameters")
        return 0

    return run(command)

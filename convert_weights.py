"""Convert ResNet weights between formats: `python convert_weights.py SRC DST [--arch NAME]`.

SRC: a torchvision .pth/.pt, a .safetensors or a .msgpack; DST: .msgpack (for train.py and
predict.py) or .safetensors (torchvision names, for going back to PyTorch). No torch needed.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="weights to read (.pth, .pt, .safetensors, .msgpack)")
    parser.add_argument("dst", help="file to write (.msgpack or .safetensors)")
    parser.add_argument("--arch", help="expected architecture, e.g. resnet34 (default: detect)")
    args = parser.parse_args(argv)

    from resnet_jax.errors import UserError  # after parsing, so --help does not wait for JAX
    from resnet_jax.weights import convert_file

    try:
        arch, n_params = convert_file(args.src, args.dst, args.arch)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src} -> {args.dst}: {arch}, {n_params:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())

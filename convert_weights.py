"""Convert ResNet weights between formats: `python convert_weights.py SRC DST [--arch NAME]`.

The program is `resnet_jax.cli.convert` (also installed as `resnet-jax-convert`).
"""

import sys

from resnet_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())

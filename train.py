"""Train a ResNet on an image folder or a tfds dataset: `python train.py --arch resnet34`.

The program is `resnet_jax.cli.train` (also installed as `resnet-jax-train`).
"""

import sys

from resnet_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

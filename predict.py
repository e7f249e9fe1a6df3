"""Classify images with a trained or converted ResNet: `python predict.py IMAGE --weights W`.

The program is `resnet_jax.cli.predict` (also installed as `resnet-jax-predict`).
"""

import sys

from resnet_jax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())

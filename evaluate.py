"""Score weights on a labelled image set: `python evaluate.py --weights W --data-dir ROOT`.

The program is `resnet_jax.cli.evaluate` (also installed as `resnet-jax-eval`).
"""

import sys

from resnet_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

"""resnet_jax.training.events: the checksum, and that writing events imports no torch.

The records themselves are read back by TensorBoard's own reader in test_tensorboard.py, which
drops any record whose checksum is wrong."""

from __future__ import annotations

import subprocess
import sys

from resnet_jax.training.events import crc32c


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"") == 0


def test_the_trainer_imports_no_torch():
    # A writer library (tensorboardX) imported torch whenever it was installed: 0.5 GB, 1-2 s.
    script = "import sys, resnet_jax.training.trainer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""resnet_jax.training.parallel on the local devices: sharding, prefetch, distributed setup. Runs on 2
devices and in 2 processes, and the batch-size check, are end to end in test_train_cli.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from resnet_jax.runtime.errors import UserError
from resnet_jax.training.parallel import DataParallel, init_distributed


def host_batches(n: int):
    for i in range(n):
        yield {"image": np.full((2, 4, 4, 3), i, np.uint8), "label": np.full(2, i, np.int32)}


def test_prefetch_keeps_order_and_places_batches_on_the_mesh():
    dp = DataParallel()
    out = list(dp.prefetch(host_batches(5), size=2))
    assert [int(b["label"][0]) for b in out] == [0, 1, 2, 3, 4]
    assert all(b["image"].sharding == dp.batch for b in out)
    assert out[3]["image"].shape == (2, 4, 4, 3) and out[3]["image"].dtype == np.uint8


def test_replicate_puts_the_same_values_everywhere():
    dp = DataParallel()
    tree = dp.replicate({"w": np.arange(6.0).reshape(2, 3)})
    assert tree["w"].sharding == dp.replicated
    np.testing.assert_array_equal(jax.device_get(tree["w"]), np.arange(6.0).reshape(2, 3))


def test_single_process_needs_no_distributed_setup(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    init_distributed(None, None, None)  # returns at once
    assert not jax.distributed.is_initialized()


def test_accumulation_needs_micro_batches_that_split_over_the_devices():
    dp = DataParallel()
    dp.check_batch_size(6 * dp.size, accumulate_steps=3)
    with pytest.raises(UserError, match="does not split into --accumulate-steps 4 micro-batches"):
        dp.check_batch_size(6 * dp.size, accumulate_steps=4)

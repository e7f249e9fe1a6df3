"""resnet_jax.data.synthetic: random device batches for throughput runs."""

from __future__ import annotations

import jax
import numpy as np

from resnet_jax.data.synthetic import synthetic_batches
from resnet_jax.training.parallel import DataParallel


def test_synthetic_batches_are_uint8_labelled_and_reproducible():
    key = jax.random.key(3)
    first = list(
        synthetic_batches(DataParallel().batch, key, 2, batch_size=2, image_size=8, num_classes=10)
    )
    again = list(
        synthetic_batches(DataParallel().batch, key, 2, batch_size=2, image_size=8, num_classes=10)
    )
    assert len(first) == 2 and first[0]["image"].dtype == np.uint8
    assert first[0]["image"].shape == (2, 8, 8, 3) and bool(first[0]["mask"].all())
    labels = np.asarray(first[0]["label"])
    assert labels.min() >= 0 and labels.max() < 10
    np.testing.assert_array_equal(first[1]["image"], again[1]["image"])
    assert not np.array_equal(first[0]["image"], first[1]["image"])

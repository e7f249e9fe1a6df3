"""Random images made on the devices, for throughput runs (`train.py --synthetic`, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Sharding

__all__ = ["synthetic_batches"]


def synthetic_batches(
    sharding: Sharding,
    key: jax.Array,
    steps: int,
    batch_size: int,
    image_size: int,
    num_classes: int,
) -> Iterator[dict[str, jax.Array]]:
    """`steps` batches of random uint8 images and labels, laid out by `sharding` (the batch
    sharding of `parallel.DataParallel`): no host work, no copies."""

    @partial(jax.jit, static_argnums=0, out_shardings=sharding)
    def make(shape, key):
        k1, k2 = jax.random.split(key)
        return {
            "image": jax.random.bits(k1, shape, jnp.uint8),
            "label": jax.random.randint(k2, shape[:1], 0, num_classes, jnp.int32),
            "mask": jnp.ones(shape[:1], bool),
        }

    for step in range(steps):
        yield make((batch_size, image_size, image_size, 3), jax.random.fold_in(key, step))

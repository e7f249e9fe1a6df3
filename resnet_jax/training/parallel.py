"""Data parallelism: a device mesh, sharded batches, the compiled steps, and multi-host setup.

One code path for one CPU, eight GPUs or many hosts: a `Mesh` over every device with one axis
'data', batches sharded along it, the train state replicated. Under `jax.jit` the loss and the
BatchNorm statistics are then computed over the global batch and XLA inserts the all-reduces.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from resnet_jax.models.registry import IMAGENET_EVAL, EvalTransform
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.steps import Batch, StepOptions, eval_step, train_step

__all__ = ["DataParallel", "init_distributed"]


def init_distributed(
    address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Join a multi-process run when the flags, JAX_COORDINATOR_ADDRESS, SLURM or Open MPI ask."""
    in_cluster = any(
        int(os.environ.get(v, "1")) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    )
    wanted = address or num_processes or process_id is not None
    if not (wanted or in_cluster or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(address, num_processes, process_id)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(
            f"Could not join the multi-process run ({str(e).splitlines()[0]}); pass "
            "--coordinator-address HOST:PORT, --num-processes N and --process-id I."
        ) from e


class DataParallel:
    """A one-axis mesh over all devices: batches split along 'data', everything else replicated."""

    def __init__(self, devices: list | None = None) -> None:
        devices = jax.devices() if devices is None else devices
        self.mesh = jax.make_mesh((len(devices),), ("data",), (AxisType.Auto,), devices=devices)
        self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @property
    def size(self) -> int:
        return self.mesh.size

    def check_batch_size(self, batch_size: int, accumulate_steps: int = 1) -> None:
        """A UserError unless the global batch splits evenly over devices and processes, and
        each device's rows into `accumulate_steps` micro-batches."""
        if batch_size % self.size:
            raise UserError(
                f"--batch-size {batch_size} is not divisible by the {self.size} devices; "
                f"use a multiple of {self.size}."
            )
        if batch_size % (self.size * accumulate_steps):
            unit = self.size * accumulate_steps
            raise UserError(
                f"--batch-size {batch_size} does not split into --accumulate-steps "
                f"{accumulate_steps} micro-batches on each of the {self.size} devices; use a "
                f"multiple of {unit}."
            )

    def replicate(self, tree: Any) -> Any:
        """Host values (the same in every process) -> arrays replicated on every device."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree
        )

    def shard(self, batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows of a global batch -> one global array sharded over the mesh."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch, x), batch)

    def prefetch(self, batches: Iterator[dict[str, np.ndarray]], size: int = 2) -> Iterator[Batch]:
        """Start copying the next `size` batches to the devices while the current one runs."""
        queue: collections.deque[Batch] = collections.deque()
        for batch in batches:
            queue.append(self.shard(batch))
            if len(queue) > size:
                yield queue.popleft()
        while queue:
            yield queue.popleft()

    def jit_train_step(self, options: StepOptions | None = None) -> Callable:
        """`train_step` with `options` (default: none) compiled for the mesh, the state's buffers
        donated to the new state."""
        r = self.replicated
        return jax.jit(
            partial(train_step, options=options or StepOptions()),
            in_shardings=(r, self.batch, r),
            out_shardings=(r, r),
            donate_argnums=0,
        )

    def jit_eval_step(
        self, transform: EvalTransform = IMAGENET_EVAL, flip: bool = False
    ) -> Callable:
        """`eval_step` compiled for the mesh (`transform`, `flip`: see `eval_step`)."""
        r = self.replicated
        step = partial(eval_step, transform=transform, flip=flip)
        return jax.jit(step, in_shardings=(r, self.batch, r), out_shardings=r)

"""Who decodes `data.Loader`'s images: threads of this process, or worker processes.

Threads need no start-up, but the Python between Pillow's calls holds the GIL, which caps them
at a few cores. Worker processes are fresh interpreters (`python -c`, not fork: the loader's
process runs JAX's threads) that import NumPy, Pillow and this package only, never JAX, whatever
the main script imports. Each writes its images straight into batch memory shared with the
loader; only row numbers, labels and errors travel through their pipes.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Protocol

import numpy as np

from resnet_jax.data.transforms import BadImage
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.memory import reuse_freed_blocks

__all__ = ["Job", "ProcessWorkers", "ThreadWorkers", "fill", "serve"]

Outcome = int | BadImage  # a row's label, or why it has none

_BOOT = (
    "import sys; sys.path[:0] = sys.argv[4:]; from resnet_jax.data.workers import serve; serve()"
)
_QUEUED_PER_WORKER = 2  # tasks sent ahead, so that a worker never waits for the loader
_EXIT_TIMEOUT_S = 10.0


Item = tuple[int, int]  # (example index, copy number: repeated augmentation's draws)


class Job(Protocol):
    """What a worker runs (`loader.Examples`): copy `copy` of example `index` in `epoch` as
    (uint8 HWC image, label), or BadImage."""

    def get(self, index: int, copy: int, epoch: int) -> tuple[np.ndarray, int]: ...


def fill(
    examples: Job, images: np.ndarray, rows: Sequence[int], items: Sequence[Item], epoch: int
) -> list[Outcome]:
    """Write example `items[k]` into `images[rows[k]]`; each row's label or BadImage."""
    outcomes: list[Outcome] = []
    for row, (index, copy) in zip(rows, items):
        try:
            images[row], label = examples.get(index, copy, epoch)
        except BadImage as e:
            outcomes.append(e)
        else:
            outcomes.append(label)
    return outcomes


class ThreadWorkers:
    """Threads of this process, for one epoch; `end_epoch` stops them."""

    def __init__(self, examples: Job, count: int, slots: int, batch_shape: tuple[int, ...]) -> None:
        self.examples = examples
        self._images = [np.empty(batch_shape, np.uint8) for _ in range(slots)]
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="resnet_jax-data")

    def submit(self, slot: int, rows: list[int], items: list[Item], epoch: int) -> Future:
        return self._pool.submit(fill, self.examples, self._images[slot], rows, items, epoch)

    def result(self, task: Future) -> list[Outcome]:
        return task.result()

    def take(self, slot: int) -> np.ndarray:
        """The slot's images, now the caller's (a new array takes its place)."""
        images = self._images[slot]
        self._images[slot] = np.empty_like(images)
        return images

    def end_epoch(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Worker:
    """One worker process and the two pipes to it."""

    def __init__(self, memory_fd: int) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        fds = (task_r, result_w, memory_fd)
        argv = [sys.executable, "-c", _BOOT, *map(str, fds), *filter(None, sys.path)]
        try:
            self.process = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            os.close(task_r)
            os.close(result_w)
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(result_r, writable=False)
        self.sent = 0  # tasks not answered yet

    def died(self) -> UserError:
        code = self.process.wait()
        if code < 0:
            return UserError(
                f"A data-loading worker process was killed by {signal.Signals(-code).name}, "
                "perhaps for lack of memory; lower --workers or --batch-size."
            )
        return UserError(
            f"A data-loading worker process stopped with exit status {code} (its error is "
            "above); pass --worker-threads to decode in the training process instead."
        )

    def join(self) -> None:
        """Wait for the worker to end (its task pipe closed), killing it after a while."""
        try:
            self.process.wait(_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.results.close()


class ProcessWorkers:
    """`count` worker processes that fill a ring of `slots` batches in shared memory.

    They stay for many epochs; `end_epoch` only waits for the tasks in flight, `close` ends them.
    """

    def __init__(self, examples: Job, count: int, slots: int, batch_shape: tuple[int, ...]) -> None:
        shape = (slots, *batch_shape)
        size = int(np.prod(shape))
        self.closed = False
        # An unnamed file in memory (a temporary file where there is no memfd): nothing to
        # clean up if this process dies; the workers inherit its descriptor.
        if hasattr(os, "memfd_create"):
            self._memory_fd = os.memfd_create("resnet_jax-batches")
        else:
            with tempfile.TemporaryFile() as f:
                self._memory_fd = os.dup(f.fileno())
        os.ftruncate(self._memory_fd, size)
        self._memory = mmap.mmap(self._memory_fd, size)
        self.images = np.ndarray(shape, np.uint8, buffer=self._memory)
        self._workers: list[_Worker] = []
        try:
            job = pickle.dumps((examples, shape))  # once: a source may list a million files
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            self.close()
            raise UserError(
                f"The images' source cannot be sent to worker processes ({e}); pass "
                "--worker-threads to decode in this process."
            ) from e
        try:
            for _ in range(count):
                self._workers.append(_Worker(self._memory_fd))
                self._workers[-1].tasks.send_bytes(job)
        except BaseException:
            self.close()
            raise
        self._queue: deque[tuple[int, tuple]] = deque()  # tasks not sent yet
        self._done: dict[int, list[Outcome]] = {}
        self._next = 0

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def submit(self, slot: int, rows: list[int], items: list[Item], epoch: int) -> int:
        task = self._next
        self._next += 1
        self._queue.append((task, (slot, rows, items, epoch)))
        self._dispatch()
        return task

    def result(self, task: int) -> list[Outcome]:
        while task not in self._done:
            self._receive()
        return self._done.pop(task)

    def take(self, slot: int) -> np.ndarray:
        """A copy of the slot's images: the slot is refilled while the caller keeps them."""
        return self.images[slot].copy()

    def end_epoch(self) -> None:
        """Drop the tasks not sent and wait for those in flight (an epoch stopped early)."""
        self._queue.clear()
        while any(w.sent for w in self._workers):
            self._receive()
        self._done.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for worker in self._workers:
            worker.tasks.close()  # each ends once its current task is done
        for worker in self._workers:
            worker.join()
        self._workers = []
        self.images = np.empty((0,), np.uint8)  # the mmap cannot close while viewed
        self._memory.close()
        os.close(self._memory_fd)

    def _dispatch(self) -> None:
        while self._queue:
            worker = min(self._workers, key=lambda w: w.sent)
            if worker.sent >= _QUEUED_PER_WORKER:
                return
            task, message = self._queue.popleft()
            worker.tasks.send((task, *message))
            worker.sent += 1

    def _receive(self) -> None:
        """Wait for answers from the busy workers; refill their queues."""
        busy = {w.results: w for w in self._workers if w.sent}
        for connection in wait(list(busy)):
            worker = busy[connection]
            try:
                task, outcomes, failure = connection.recv()
            except EOFError:
                error = worker.died()
                self.close()
                raise error from None
            worker.sent -= 1
            if failure is not None:  # a bug, not a bad image: the worker's traceback
                last = failure.strip().splitlines()[-1]
                if "MemoryError" in last.split(":")[0]:  # the command lines report it
                    raise MemoryError(f"A data-loading worker process: {last}")
                raise RuntimeError(f"A data-loading worker process failed:\n{failure}")
            self._done[task] = outcomes
        self._dispatch()


def serve() -> None:
    """A worker process's main loop: fill the rows each task names until the task pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the loader's process
    reuse_freed_blocks()
    task_fd, result_fd, memory_fd = map(int, sys.argv[1:4])
    tasks = Connection(task_fd, writable=False)
    results = Connection(result_fd, readable=False)
    examples, shape = tasks.recv()
    images = np.ndarray(shape, np.uint8, buffer=mmap.mmap(memory_fd, int(np.prod(shape))))
    while True:
        try:
            task, slot, rows, items, epoch = tasks.recv()
        except EOFError:  # the loader closed the pipe: done
            return
        outcomes, failure = None, None
        try:
            outcomes = fill(examples, images[slot], rows, items, epoch)
        except Exception:  # noqa: BLE001 (the loader raises it, with this traceback)
            failure = traceback.format_exc()
        try:
            results.send((task, outcomes, failure))
        except BrokenPipeError:  # the loader's process is gone
            return

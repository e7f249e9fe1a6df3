"""Sources for tests of worker processes, in a module that imports no JAX (workers import it)."""

from __future__ import annotations

import os
import sys

from PIL import Image

from resnet_jax.data.sources import Source

__all__ = ["Hungry", "JaxProbe", "Killer"]


class JaxProbe(Source):
    """Blank images labelled 1 when JAX is imported in the process that reads them, else 0."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.classes = ["no jax", "jax"]

    def __len__(self) -> int:
        return self.size

    def example(self, i: int, lazy: bool = False) -> tuple[Image.Image, int]:
        return Image.new("RGB", (8, 8)), int("jax" in sys.modules)


class Killer(JaxProbe):
    """Example `fatal` kills the process that reads it, as the kernel's OOM killer would."""

    def __init__(self, size: int, fatal: int) -> None:
        super().__init__(size)
        self.fatal = fatal

    def example(self, i: int, lazy: bool = False) -> tuple[Image.Image, int]:
        if i == self.fatal:
            os.kill(os.getpid(), 9)
        return super().example(i, lazy)


class Hungry(Killer):
    """Example `fatal` fails to allocate in the process that reads it, as under a memory limit."""

    def example(self, i: int, lazy: bool = False) -> tuple[Image.Image, int]:
        if i == self.fatal:
            raise MemoryError("Unable to allocate 9.00 MiB for an image")
        return super().example(i, lazy)

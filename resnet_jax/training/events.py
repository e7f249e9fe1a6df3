"""TensorBoard's event files written directly: TFRecord records of hand-encoded `Event` protos.

A writer library would do the same but costs a second on import (tensorboardX imports torch
when it is installed, with 0.5 GB of memory); the handful of messages written here need only the
protobuf wire format. Field numbers are those of TensorBoard's event.proto and summary.proto.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

__all__ = ["EventFile", "crc32c", "image_value", "scalar_value", "session_start", "summary"]


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, the checksum TFRecord files carry."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------
# Protocol buffer wire format: a key (field number and wire type) before each value.


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int_field(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def scalar_value(tag: str, value: float) -> bytes:
    """A `Summary.Value` with a float `simple_value`."""
    return _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def image_value(tag: str, png: bytes) -> bytes:
    """A `Summary.Value` holding a PNG (`Summary.Image`, colorspace 4: RGBA)."""
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR chunk
    image = _int_field(1, height) + _int_field(2, width) + _int_field(3, 4)
    return _bytes_field(1, tag.encode()) + _bytes_field(4, image + _bytes_field(4, png))


def summary(values: list[bytes]) -> bytes:
    """A `Summary` of encoded values: the `summary` part of an event."""
    return _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))


def session_start() -> bytes:
    """A `SessionLog` START: TensorBoard drops earlier files' points at or after its step."""
    return _bytes_field(7, _int_field(1, 1))


class EventFile:
    """One event file in `directory`, named as TensorBoard expects; every write is flushed and
    fsynced. Opened on creation with the file-version record TensorBoard reads first."""

    def __init__(self, directory: Path, suffix: str = "") -> None:
        stamp = f"{int(time.time()):010d}"
        self.path = directory / f"events.out.tfevents.{stamp}.{socket.gethostname()}{suffix}"
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.write(_bytes_field(3, b"brain.Event:2"))

    def write(self, what: bytes, step: int | None = None) -> None:
        """An `Event` at `step` (none for the file version) made of `what`, e.g. `summary()`."""
        event = struct.pack("<Bd", 1 << 3 | 1, time.time())  # wall_time, a double
        if step is not None:
            event += _int_field(2, step)
        record = event + what
        header = struct.pack("<Q", len(record))
        self._file.write(header + _masked_crc(header) + record + _masked_crc(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

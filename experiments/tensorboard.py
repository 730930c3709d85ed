"""TensorBoard event files without TensorFlow: scalar summaries in the standard on-disk format.

``tensorboard --logdir <workdir>/tensorboard`` reads what :class:`ScalarWriter` writes. An event
file is a sequence of TFRecord frames (little-endian uint64 length, masked CRC-32C of the length,
payload, masked CRC-32C of the payload) whose payloads are serialised ``tensorflow.Event``
protocol buffers; the first one declares ``file_version = "brain.Event:2"``. Only the fields a
scalar needs are encoded (Event: wall_time = 1, step = 2, file_version = 3, summary = 5;
Summary.value = 1; Value: tag = 1, simple_value = 2), by hand, so neither TensorFlow nor
tensorboardX is a dependency.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # two's complement for negative int64, as protobuf does
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """A serialised ``Event`` with a file version or scalar ``Summary`` values."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _field(5, values)
    return out


def frame(payload: bytes) -> bytes:
    """One TFRecord frame around ``payload``."""
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


class ScalarWriter:
    """Appends scalar summaries to a new event file in ``logdir`` (one file per writer)."""

    def __init__(self, logdir: str | pathlib.Path):
        logdir = pathlib.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._f = self.path.open("ab")
        self._f.write(frame(encode_event(time.time(), file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._f.write(frame(encode_event(time.time(), int(step), scalars=values)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()

"""The readable-stream shape bytes travel in, from a child process through the stages to
storage and back.

It sits at the bottom (beside model and errors) because every layer speaks it: ``pg``'s
child processes produce it, the pipeline's stages wrap it, storage consumes it.
"""

from __future__ import annotations

import io
from typing import Protocol

CHUNK = 1 << 20  # 1 MiB: large enough that per-chunk Python overhead vanishes


class Readable(Protocol):
    """Anything with ``read(n) -> bytes`` that returns b"" only at the end."""

    def read(self, size: int = -1, /) -> bytes: ...


class Reader(io.RawIOBase):
    """Base for stream readers: subclasses implement ``read_chunk``; b"" means EOF."""

    def readable(self) -> bool:
        return True

    def read_chunk(self, size: int) -> bytes:
        raise NotImplementedError

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read_chunk(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        return self.read_chunk(size) if size else b""

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read_chunk(len(buffer))
        buffer[: len(data)] = data
        return len(data)

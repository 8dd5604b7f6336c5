"""The readable-stream shape every stage consumes and produces, and the raw-byte counter.

The shape itself (``CHUNK``, ``Readable``, ``Reader``) lives in ``pgvault.bytestream``, below
``pg`` and storage, which speak it too; it is re-exported here for the stages.
"""

from __future__ import annotations

from collections.abc import Callable

from pgvault.bytestream import CHUNK, Readable, Reader

__all__ = ["CHUNK", "CountingReader", "Progress", "Readable", "Reader"]

Progress = Callable[[int], None]


class CountingReader(Reader):
    """Counts raw bytes on their way into the pipeline and reports progress."""

    def __init__(self, source: Readable, progress: Progress | None) -> None:
        super().__init__()
        self._source = source
        self._progress = progress
        self.size = 0

    def read_chunk(self, size: int) -> bytes:
        data = self._source.read(size)
        self.size += len(data)
        if self._progress is not None and data:
            self._progress(len(data))
        return data

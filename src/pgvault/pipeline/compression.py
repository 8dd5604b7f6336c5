"""Compression stages: zstd (default, multi-threaded) and gzip (for .sql.gz habits)."""

from __future__ import annotations

import zlib
from typing import Any, cast

from pgvault.errors import IntegrityError
from pgvault.pipeline.stream import CHUNK, Readable, Reader

# Decoders feed the decompressor small inputs so one call's output stays bounded in memory:
# at most DECODE_INPUT, less when the data expands a lot (pgbench's compresses 100x: 128 KiB
# of input made ~12 MB per call, and restore peaked at 80 MB RSS instead of ~50).
DECODE_INPUT = 128 << 10
DECODE_INPUT_MIN = 4 << 10
JOB_SIZE = 2 << 20
# Level 3 looks for matches of 6 bytes instead of 5: on pg_dump output it compressed 7%
# faster and 1.7% smaller (shop dump), and alike on pgbench's. The format is unchanged:
# any zstd decoder reads it.
LEVEL_TUNING: dict[int, dict[str, int]] = {3: {"min_match": 6}}


class ZstdEncoder(Reader):
    """Reads raw bytes and yields one zstd frame."""

    def __init__(self, source: Readable, *, level: int, threads: int) -> None:
        super().__init__()
        import zstandard

        # The frame checksum lets `zstd -d` alone detect damage, without our manifest.
        # 2 MiB jobs halve multi-threaded memory at level 3 (65 -> 29 MB) for <1% of ratio.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, job_size=JOB_SIZE if threads else 0, write_checksum=True,
            **LEVEL_TUNING.get(level, {}),
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
        self._reader: Any = compressor.stream_reader(cast(Any, source), read_size=CHUNK)

    def read_chunk(self, size: int) -> bytes:
        data: bytes = self._reader.read(size)
        return data


class _Decoder(Reader):
    """Feeds compressed input to a decompressor; at EOF insists the stream was complete."""

    codec = ""

    def __init__(self, source: Readable) -> None:
        super().__init__()
        self._source = source
        self._pending = b""
        self._offset = 0  # served up to here; slicing the rest off each time would copy it
        self._done = False
        self._input_size = DECODE_INPUT_MIN

    def _decompress(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _complete(self) -> bool:
        raise NotImplementedError

    def read_chunk(self, size: int) -> bytes:
        while self._offset >= len(self._pending) and not self._done:
            data = self._source.read(self._input_size)
            if not data:
                self._done = True
                if not self._complete():
                    raise IntegrityError(f"{self.codec} stream is truncated (no end of frame)")
                break
            self._pending, self._offset = self._decompress(data), 0
            # Aim the next call's output at about CHUNK, whatever the compression ratio;
            # start small, since the first call cannot know it.
            growth = len(self._pending) // len(data)
            wanted = CHUNK // growth if growth else self._input_size * 2
            self._input_size = max(DECODE_INPUT_MIN, min(DECODE_INPUT, wanted))
        if self._offset == 0 and size >= len(self._pending):
            out, self._pending = self._pending, b""
            return out
        out = self._pending[self._offset : self._offset + size]
        self._offset += len(out)
        return out


class ZstdDecoder(_Decoder):
    """Decodes one zstd frame; trailing garbage or a missing end of frame is an error."""

    codec = "zstd"

    def __init__(self, source: Readable) -> None:
        super().__init__(source)
        import zstandard

        self._obj: Any = zstandard.ZstdDecompressor().decompressobj()
        self._error: type[Exception] = zstandard.ZstdError

    def _decompress(self, data: bytes) -> bytes:
        if self._obj.eof:
            raise IntegrityError("zstd stream has data after its end")
        try:
            out: bytes = self._obj.decompress(data)
        except self._error as exc:
            raise IntegrityError(f"zstd stream is corrupt: {exc}") from None
        if self._obj.eof and self._obj.unused_data:
            raise IntegrityError("zstd stream has data after its end")
        return out

    def _complete(self) -> bool:
        return bool(self._obj.eof)


class GzipEncoder(Reader):
    """Reads raw bytes and yields a gzip member (what `gzip` and `gunzip` speak)."""

    def __init__(self, source: Readable, *, level: int) -> None:
        super().__init__()
        self._source = source
        self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._pending = b""
        self._done = False

    def read_chunk(self, size: int) -> bytes:
        while not self._pending and not self._done:
            data = self._source.read(CHUNK)
            if data:
                self._pending = self._obj.compress(data)
            else:
                self._pending = self._obj.flush()
                self._done = True
        out, self._pending = self._pending[:size], self._pending[size:]
        return out


class GzipDecoder(_Decoder):
    """Decodes one gzip member and checks its CRC and length trailer."""

    codec = "gzip"

    def __init__(self, source: Readable) -> None:
        super().__init__(source)
        self._obj = zlib.decompressobj(31)

    def _decompress(self, data: bytes) -> bytes:
        if self._obj.eof:
            raise IntegrityError("gzip stream has data after its end")
        try:
            return self._obj.decompress(data)
        except zlib.error as exc:
            raise IntegrityError(f"gzip stream is corrupt: {exc}") from None

    def _complete(self) -> bool:
        return self._obj.eof

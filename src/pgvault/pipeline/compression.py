"""Compression stages: zstd (default, multi-threaded) and gzip (for .sql.gz habits)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

from pgvault.errors import IntegrityError
from pgvault.pipeline.stream import CHUNK, Readable, Reader

# Decoders feed the decompressor small inputs so one call's output stays bounded in memory:
# at most DECODE_INPUT, less when the data expands a lot (pgbench's compresses 100x: 128 KiB
# of input made ~12 MB per call, and restore peaked at 80 MB RSS instead of ~50).
DECODE_INPUT = 128 << 10
DECODE_INPUT_MIN = 4 << 10
JOB_SIZE = 1 << 20
# Level 3 looks for matches of 6 bytes instead of 5: on pg_dump output it compressed 7%
# faster and 1.7% smaller (shop dump), and alike on pgbench's. The format is unchanged:
# any zstd decoder reads it.
LEVEL_TUNING: dict[int, dict[str, int]] = {3: {"min_match": 6}}


class Boundaries(Protocol):
    """Watches a stream go by and names the offsets where a new frame should begin."""

    @property
    def offsets(self) -> Mapping[int, int]:
        """A name for each boundary found so far -> its offset in the stream."""

    def feed(self, data: bytes) -> None: ...


# A boundary is reported once the bytes that follow it have been seen: this many at most.
# Holding them back keeps every boundary ahead of what was compressed.
BOUNDARY_LOOKAHEAD = 64
# Frames end at least this often, so a restore can decompress several at once; at zstd's
# levels 1-3 (windows of 0.5-1 MiB) it costs no measurable ratio.
FRAME_RAW_MAX = 8 << 20


class FrameStart(NamedTuple):
    """Where a zstd frame begins: in the compressed stream and in the raw one."""

    name: int  # the boundary's name (a pg_dump dump id), 0 where only size ended the frame
    offset: int
    raw_offset: int


@dataclass
class FrameSplit:
    """Where to end zstd frames (at ``boundaries``, and every FRAME_RAW_MAX bytes), and where
    each frame after the first began."""

    boundaries: Boundaries
    starts: list[FrameStart] = field(default_factory=list)


class ZstdEncoder(Reader):
    """Reads raw bytes and yields one zstd frame, or a series of them when ``split`` is given.

    Each frame of a series decompresses alone, so a restore can decompress them in parallel,
    and any zstd decoder reads the series as one stream.
    """

    def __init__(self, source: Readable, *, level: int, threads: int,
                 split: FrameSplit | None = None) -> None:
        super().__init__()
        import zstandard

        # The frame checksum lets `zstd -d` alone detect damage, without our manifest.
        # Small jobs bound multi-threaded memory: 2 MiB halved level 3's (65 -> 29 MB); 1 MiB
        # took an encoder of the 300 MB shop dump from 39 to 33 MB RSS at level 1 for 0.08%
        # more output (from 41 to 32 MB at level 3, for 1%).
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, job_size=JOB_SIZE if threads else 0, write_checksum=True,
            **LEVEL_TUNING.get(level, {}),
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
        self._split = split
        if split is None:
            self._reader: Any = compressor.stream_reader(cast(Any, source), read_size=CHUNK)
            return
        self._source = source
        self._compressor = compressor
        self._frame: Any = compressor.compressobj()
        self._finish = zstandard.COMPRESSOBJ_FLUSH_FINISH
        self._seen: set[int] = set()
        self._held = b""  # read, not yet compressed: where a boundary may still be found
        self._in = 0  # raw bytes compressed so far
        self._frame_in = 0  # raw offset where the current frame began
        self._out = 0  # compressed bytes produced so far
        self._pending = b""
        self._sent = 0  # of _pending
        self._done = False

    def read_chunk(self, size: int) -> bytes:
        if self._split is None:
            data: bytes = self._reader.read(size)
            return data
        while self._sent >= len(self._pending) and not self._done:
            self._pending, self._sent = self._next_output(), 0
        out = self._pending[self._sent:self._sent + size]
        self._sent += len(out)
        return out

    def _next_output(self) -> bytes:
        assert self._split is not None
        data = self._source.read(CHUNK)
        if data:
            self._split.boundaries.feed(data)
        # What may be compressed now: the bytes held back last time, then ``data`` but its
        # last BOUNDARY_LOOKAHEAD; read in place, since a 1 MiB copy per chunk showed in RSS.
        held, view = self._held, memoryview(data)
        keep = min(BOUNDARY_LOOKAHEAD, len(data)) if data else 0
        end = self._in + len(held) + len(data) - keep
        named = sorted((offset, name) for name, offset in self._split.boundaries.offsets.items()
                       if name not in self._seen and offset < end)
        self._seen.update(name for _, name in named)
        # A boundary behind what is compressed (a lookahead too short) gets no frame.
        cuts = [(offset, name) for offset, name in named if offset >= self._in]
        parts = []
        pos = self._in

        def compress_to(stop: int) -> None:
            first = self._in + len(held)  # stream offset of data[0]
            if pos < first:
                parts.append(self._compress(memoryview(held)[pos - self._in:
                                                             min(stop, first) - self._in]))
            if stop > first:
                parts.append(self._compress(view[max(pos, first) - first:stop - first]))

        while True:
            by_size = self._frame_in + FRAME_RAW_MAX
            offset, name = cuts[0] if cuts else (end, 0)
            if by_size < offset:
                offset, name = by_size, 0
            elif cuts:
                cuts.pop(0)
            if offset >= end:
                break
            last = self._split.starts[-1] if self._split.starts else None
            if last is not None and last.raw_offset == offset:  # the frame just began here
                self._split.starts[-1] = last._replace(name=name or last.name)
                continue
            compress_to(offset)
            parts.append(self._end_frame())
            self._split.starts.append(FrameStart(name, self._out, offset))
            self._frame_in = pos = offset
        compress_to(end)
        if not data:
            parts.append(self._end_frame())
            self._done = True
        self._held = data[len(data) - keep:] if data else b""
        self._in = end
        return b"".join(parts)

    def _compress(self, raw: memoryview) -> bytes:
        out: bytes = self._frame.compress(raw)
        self._out += len(out)
        return out

    def _end_frame(self) -> bytes:
        out: bytes = self._frame.flush(self._finish)
        self._out += len(out)
        self._frame = self._compressor.compressobj()
        return out


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
    """Decodes zstd frames one after another; a missing end of frame is an error."""

    codec = "zstd"

    def __init__(self, source: Readable) -> None:
        super().__init__(source)
        import zstandard

        self._decompressor = zstandard.ZstdDecompressor()
        self._obj: Any = self._decompressor.decompressobj()
        self._error: type[Exception] = zstandard.ZstdError

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            if self._obj.eof:  # the next frame
                self._obj = self._decompressor.decompressobj()
            try:
                parts.append(self._obj.decompress(data))
            except self._error as exc:
                raise IntegrityError(f"zstd stream is corrupt: {exc}") from None
            data = self._obj.unused_data if self._obj.eof else b""
        return b"".join(parts)

    def _complete(self) -> bool:
        return bool(self._obj.eof)


class GzipEncoder(Reader):
    """Reads raw bytes and yields a gzip member (what `gzip` and `gunzip` speak)."""

    def __init__(self, source: Readable, *, level: int) -> None:
        super().__init__()
        self._source = source
        self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._pending = b""
        self._sent = 0  # of _pending
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

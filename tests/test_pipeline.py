"""Pipeline stages: round trips, and every way a stored stream can be damaged is caught."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess

import pytest
import zstandard

from pgvault import pipeline
from pgvault.errors import IntegrityError
from pgvault.pipeline import compression
from pgvault.pipeline.compression import FRAME_RAW_MAX
from pgvault.pipeline.digest import HashingReader, VerifyingReader
from pgvault.pipeline.pump import Prefetch

DATA = os.urandom(1 << 20) + b"pgvault " * 300_000  # incompressible and compressible parts


def encoded(algorithm: str, data: bytes = DATA) -> tuple[bytes, list[pipeline.StageSpec]]:
    stages = pipeline.compression_spec(algorithm, None, 2)
    return pipeline.encode(io.BytesIO(data), stages).read(), stages


@pytest.mark.parametrize("algorithm", ["zstd", "gzip", "none"])
def test_round_trip(algorithm: str) -> None:
    blob, stages = encoded(algorithm)
    assert pipeline.decode(io.BytesIO(blob), stages).read() == DATA
    if algorithm != "none":
        assert len(blob) < len(DATA)


def test_empty_stream_round_trips() -> None:
    blob, stages = encoded("zstd", b"")
    assert pipeline.decode(io.BytesIO(blob), stages).read() == b""


@pytest.mark.parametrize("algorithm", ["zstd", "gzip"])
@pytest.mark.parametrize("cut", ["half", "before_trailer", "last_byte"])
def test_truncated_stream_is_refused(algorithm: str, cut: str) -> None:
    blob, stages = encoded(algorithm)
    keep = {"half": len(blob) // 2, "before_trailer": len(blob) - 8, "last_byte": len(blob) - 1}
    with pytest.raises(IntegrityError, match=r"truncated|corrupt"):
        pipeline.decode(io.BytesIO(blob[: keep[cut]]), stages).read()


@pytest.mark.parametrize("algorithm", ["zstd", "gzip"])
def test_flipped_bit_is_refused(algorithm: str) -> None:
    blob, stages = encoded(algorithm)
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x10
    with pytest.raises(IntegrityError):
        pipeline.decode(io.BytesIO(bytes(damaged)), stages).read()


@pytest.mark.parametrize("junk", [b"junk", b"\x28\xb5", b"\x00" * 40])
def test_trailing_garbage_is_refused(junk: bytes) -> None:
    # The decoder reads frame after frame (framed backups): junk is a frame that is not one.
    blob, stages = encoded("zstd")
    with pytest.raises(IntegrityError, match=r"corrupt|truncated"):
        pipeline.decode(io.BytesIO(blob + junk), stages).read()


class Marks:
    """Boundaries at fixed offsets, reported only once the stream has gone 10 bytes past."""

    def __init__(self, at: dict[int, int]) -> None:
        self.at, self.seen, self.offsets = at, 0, {}

    def feed(self, data: bytes) -> None:
        self.seen += len(data)
        self.offsets = {k: v for k, v in self.at.items() if v + 10 <= self.seen}


@pytest.mark.parametrize("threads", [0, 2])
def test_split_frames_decode_alone_and_as_one_stream(threads: int) -> None:
    data = DATA * 9  # 30 MiB: frames end at the marks and every FRAME_RAW_MAX bytes
    marks = {7: 1000, 8: 5 << 20, 9: (5 << 20) + 1, 10: len(data) - 20}
    split = compression.FrameSplit(Marks(marks))
    blob = compression.ZstdEncoder(io.BytesIO(data), level=1, threads=threads,
                                   split=split).read()
    starts = split.starts
    assert {s.name: s.raw_offset for s in starts if s.name} == marks
    raw = [s.raw_offset for s in starts]
    assert raw == sorted(raw) and max(b - a for a, b in zip([0, *raw], [*raw, len(data)],
                                                           strict=True)) <= FRAME_RAW_MAX
    bounds = list(zip([(0, 0), *[(s.offset, s.raw_offset) for s in starts]],
                      [*[(s.offset, s.raw_offset) for s in starts], (len(blob), len(data))],
                      strict=True))
    for (offset, raw_offset), (end, raw_end) in bounds:
        frame = zstandard.ZstdDecompressor().decompressobj()
        assert frame.decompress(blob[offset:end]) == data[raw_offset:raw_end]
        assert frame.eof and not frame.unused_data
    stages = pipeline.compression_spec("zstd", 1, threads)
    assert pipeline.decode(io.BytesIO(blob), stages).read() == data
    out = subprocess.run(["zstd", "-d", "-c"], input=blob, capture_output=True, check=True)
    assert out.stdout == data


def test_stock_tools_decode_our_streams() -> None:
    """What pgvault writes, `zstd -d` and `gzip -d` read: the formats are the standard ones."""
    for algorithm, argv in (("zstd", ["zstd", "-d", "-c"]), ("gzip", ["gzip", "-d", "-c"])):
        blob, _ = encoded(algorithm)
        out = subprocess.run(argv, input=blob, capture_output=True, check=True).stdout
        assert out == DATA


def test_gzip_stage_reads_stock_gzip() -> None:
    stages = pipeline.compression_spec("gzip", None, 1)
    assert pipeline.decode(io.BytesIO(gzip.compress(DATA)), stages).read() == DATA


def test_hashing_and_verifying_readers_agree() -> None:
    hashed = HashingReader(io.BytesIO(DATA))
    assert hashed.read() == DATA
    assert hashed.size == len(DATA)
    assert hashed.sha256 == hashlib.sha256(DATA).hexdigest()
    ok = VerifyingReader(io.BytesIO(DATA), size=len(DATA), sha256=hashed.sha256, what="x")
    assert ok.read() == DATA and ok.verified


@pytest.mark.parametrize(
    "stored, message",
    [
        (DATA[:-1], "truncated"),
        (DATA + b"!", "longer"),
        (DATA[:-1] + b"!", "sha256"),
    ],
)
def test_verifying_reader_names_the_damage(stored: bytes, message: str) -> None:
    digest = hashlib.sha256(DATA).hexdigest()
    reader = VerifyingReader(io.BytesIO(stored), size=len(DATA), sha256=digest, what="db.dump")
    with pytest.raises(IntegrityError, match=message) as caught:
        reader.read()
    assert "db.dump" in str(caught.value)


def test_unknown_stage_on_decode_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="lacks"):
        pipeline.decode(io.BytesIO(b""), [pipeline.StageSpec(name="rot13")])


class _Source:
    """Yields ``data`` in ``step``-byte reads, then raises ``error`` if given (else EOF)."""

    def __init__(self, data: bytes, step: int, error: BaseException | None = None) -> None:
        self.data, self.step, self.error, self.pos = data, step, error, 0

    def read(self, size: int = -1, /) -> bytes:
        if self.pos >= len(self.data) and self.error is not None:
            raise self.error
        out = self.data[self.pos:self.pos + min(size, self.step)]
        self.pos += len(out)
        return out


def test_prefetch_yields_the_source_unchanged() -> None:
    data = os.urandom(3 << 20)
    ahead = Prefetch(_Source(data, 100_000))
    assert b"".join(iter(lambda: ahead.read(77_777), b"")) == data
    assert ahead.read(10) == b""


def test_prefetch_raises_the_source_error_unchanged() -> None:
    error = IntegrityError("backup X: sha256 mismatch")
    ahead = Prefetch(_Source(b"x" * 5000, 1000, error))
    with pytest.raises(IntegrityError) as raised:
        while ahead.read(1 << 20):
            pass
    assert raised.value is error


def test_prefetch_stops_reading_when_closed() -> None:
    endless = _Source(b"", 0)
    endless.read = lambda size=-1: b"y" * 1000  # type: ignore[method-assign]
    ahead = Prefetch(endless)
    assert ahead.read(10) == b"y" * 10
    ahead.close()
    ahead._thread.join(timeout=5)
    assert not ahead._thread.is_alive()


def test_decoding_very_compressible_data_keeps_memory_bounded() -> None:
    """pgbench-like rows (~100x): one decoder call must not expand into tens of MB."""
    import tracemalloc

    import zstandard

    raw = b"".join(b"%d\t%d\t0\t" % (i, i // 100000) + b" " * 84 + b"\n"
                   for i in range(400_000))
    packed = zstandard.ZstdCompressor(level=1).compress(raw)
    assert len(raw) / len(packed) > 20
    decoder = pipeline.decode(io.BytesIO(packed), [pipeline.StageSpec(name="zstd", level=1)])
    tracemalloc.start()
    try:
        digest = hashlib.sha256()
        while chunk := decoder.read(1 << 20):
            digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.digest() == hashlib.sha256(raw).digest()
    assert peak < 8 << 20, f"decoding peaked at {peak >> 20} MiB"


def test_child_output_reads_a_chattering_child_in_few_large_reads() -> None:
    """A child writing 4 KiB at a time (pg_dump on a pipe) is read in far fewer, larger reads."""
    import sys

    from pgvault.errors import BackupFailed
    from pgvault.pg.process import ChildOutput

    # Bursts of 4 writes with a short sleep between, like pg_dump waiting on its server:
    # read as it came, every burst was at least one read of its own.
    bursts, size = 2560, 4096
    script = (f"import os, time\nb = b'x' * {size}\n"
              f"for _ in range({bursts}):\n"
              f"    for _ in range(4): os.write(1, b)\n"
              f"    time.sleep(0.0001)\n")
    child = ChildOutput([sys.executable, "-c", script], env=dict(os.environ),
                        error=BackupFailed)
    reads = total = 0
    while data := child.read(1 << 20):
        reads += 1
        total += len(data)
    assert total == bursts * 4 * size
    assert reads < bursts // 2, reads

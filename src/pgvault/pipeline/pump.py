"""Run a push-style stage in a thread and read its output: bounded queue, errors passed on.

pyrage pushes from a reader into a writer; the pipeline pulls. A pump runs the push side in
a thread that hands its output over through a small bounded queue. ``Prefetch`` is the
trivial pump: it reads the stage before it ahead, so that stage's work (hashing,
decompression: both release the GIL) overlaps with the consumer's.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Callable
from typing import Any

from pgvault.errors import IntegrityError
from pgvault.pipeline.stream import CHUNK, Readable, Reader

QUEUE_DEPTH = 4
"""Chunks of up to CHUNK bytes in flight between the thread and the consumer."""
STOP_POLL = 0.2
"""How often a blocked hand-over checks whether the consumer has gone away (seconds)."""


class _Stopped(Exception):
    """Raised inside a pump thread when the consumer has gone away."""


_END = object()


def _offer(chunks: queue.Queue[object], stop: threading.Event, item: object) -> None:
    """Put ``item``, waiting for room, unless the consumer stops first."""
    while not stop.is_set():
        try:
            chunks.put(item, timeout=STOP_POLL)
            return
        except queue.Full:
            continue
    raise _Stopped


class _SourceReader(io.RawIOBase):
    """The pipeline source as the file-like object pyrage reads; keeps the source's error."""

    def __init__(self, source: Readable, stop: threading.Event) -> None:
        super().__init__()
        self._source = source
        self._stop = stop
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._stop.is_set():
            raise _Stopped
        try:
            data = self._source.read(len(buffer))
        except BaseException as exc:
            self.error = exc
            raise
        buffer[: len(data)] = data
        return len(data)


class _QueueWriter(io.RawIOBase):
    """The file-like object pyrage writes to: gathers CHUNK-sized pieces into the queue."""

    def __init__(self, chunks: queue.Queue[object], stop: threading.Event) -> None:
        super().__init__()
        self._chunks = chunks
        self._stop = stop
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        if len(self._buffer) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            _offer(self._chunks, self._stop, data)


Work = Callable[[Any, Any], None]
Translate = Callable[[BaseException], BaseException]


def _run(work: Work, source: Readable, chunks: queue.Queue[object], stop: threading.Event,
         translate: Translate, drain: bool) -> None:
    """Thread body. Holds no reference to the consumer, so dropping it ends the thread."""
    reader = _SourceReader(source, stop)
    buffered = io.BufferedReader(reader, CHUNK)
    writer = _QueueWriter(chunks, stop)
    result: object = _END
    try:
        work(buffered, writer)
        writer.flush()
        if drain and buffered.read():
            raise IntegrityError("data after the end of the age stream")
    except _Stopped:
        return
    except BaseException as exc:
        if stop.is_set():
            return
        result = reader.error if reader.error is not None else translate(exc)
    with contextlib.suppress(_Stopped):
        _offer(chunks, stop, result)


Body = Callable[[queue.Queue[object], threading.Event], None]


def pushing(source: Readable, work: Work, translate: Translate, *, drain: bool = False) -> Body:
    """A pump body running ``work(reader, writer)`` over ``source``."""
    def body(chunks: queue.Queue[object], stop: threading.Event) -> None:
        _run(work, source, chunks, stop, translate, drain)
    return body


class Pump(Reader):
    """Runs ``body`` in a thread and yields what it hands over, in order.

    Memory stays bounded by QUEUE_DEPTH chunks. An error in the thread is raised by the
    next read; an error of the source is raised unchanged. ``close`` (or dropping the
    reader) stops the thread at its next read or write.
    """

    def __init__(self, body: Body) -> None:
        super().__init__()
        self._chunks: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._stop = threading.Event()
        self._pending = b""
        self._offset = 0
        self._done = False
        self._thread = threading.Thread(
            target=body, args=(self._chunks, self._stop), name="pgvault-pump", daemon=True)
        self._thread.start()

    def _next(self) -> None:
        """Take the next chunk from the thread; raise its error; mark the end."""
        while True:
            try:  # timed: a signal is handled at once however the thread is stuck
                item = self._chunks.get(timeout=STOP_POLL)
                break
            except queue.Empty:
                continue
        if item is _END:
            self._done = True
        elif isinstance(item, BaseException):
            self._done = True
            self._stop.set()
            raise item
        else:
            assert isinstance(item, bytes)
            self._pending, self._offset = item, 0

    def read_chunk(self, size: int) -> bytes:
        while self._offset >= len(self._pending):
            if self._done:
                return b""
            self._next()
        out = self._pending[self._offset : self._offset + size]
        self._offset += len(out)
        return out

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            with contextlib.suppress(queue.Empty):
                while True:  # free the queued chunks now, not when the thread notices
                    self._chunks.get_nowait()
        super().close()


def _read_ahead(source: Readable, chunks: queue.Queue[object], stop: threading.Event) -> None:
    """Thread body of Prefetch: the source's chunks as they are, then its end or error."""
    result: object = _END
    try:
        while data := source.read(CHUNK):
            _offer(chunks, stop, data)
    except _Stopped:
        return
    except BaseException as exc:
        if stop.is_set():
            return
        result = exc
    with contextlib.suppress(_Stopped):
        _offer(chunks, stop, result)


class Prefetch(Pump):
    """Reads ``source`` ahead in a thread, at most QUEUE_DEPTH chunks, errors unchanged."""

    def __init__(self, source: Readable) -> None:
        def body(chunks: queue.Queue[object], stop: threading.Event) -> None:
            _read_ahead(source, chunks, stop)
        super().__init__(body)

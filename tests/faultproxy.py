"""A TCP proxy that injects network faults between pgvault and a real server (moto's S3).

Faults a test can arm, each for the connections that reach its trigger:

- stall: once a connection has carried ``stall_after_up`` bytes towards the server, the proxy
  stops reading from both sides and keeps the connection open (a dead uplink: the sender's
  buffers fill and its ``send`` blocks, nothing ever answers).
- reset: once a GET's response has carried ``reset_after_down`` bytes towards the client,
  the connection is reset (RST), as a middlebox dropping state would.
- slow: every chunk forwarded waits so that each direction moves at most ``rate`` bytes/s
  (``rate_up``: only the direction towards the server, as an uplink slower than its downlink).

``stalls`` / ``resets`` bound how many connections get the fault (None: every one).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

_CHUNK = 64 << 10
_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


@dataclass
class Faults:
    stall_after_up: int | None = None
    stalls: int | None = None
    reset_after_down: int | None = None
    resets: int | None = None
    rate: float | None = None
    rate_up: float | None = None
    # What happened, for the test to assert on.
    stalled: int = 0
    reset: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take_stall(self) -> bool:
        with self.lock:
            if self.stalls is not None and self.stalled >= self.stalls:
                return False
            self.stalled += 1
            return True

    def take_reset(self) -> bool:
        with self.lock:
            if self.resets is not None and self.reset >= self.resets:
                return False
            self.reset += 1
            return True


class FaultProxy:
    """Listens on 127.0.0.1; forwards every connection to ``target`` under ``faults``."""

    def __init__(self, target: tuple[str, int], faults: Faults | None = None) -> None:
        self.target = target
        self.faults = faults or Faults()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            with self.faults.lock:
                self.faults.connections += 1
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        faults = self.faults
        up = 0  # bytes towards the server on this connection
        down = 0  # bytes of the current GET's response towards the client
        in_get = False
        stall_armed = faults.stall_after_up is not None
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([client, server], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    if sock is client:
                        if data.startswith(_METHODS):
                            in_get, down = data.startswith(b"GET "), 0
                        if stall_armed and up + len(data) >= faults.stall_after_up:  # type: ignore[operator]
                            stall_armed = False
                            if faults.take_stall():
                                server.sendall(data[: max(0, faults.stall_after_up - up)])  # type: ignore[operator]
                                self._closed.wait()  # open, silent, until the test ends
                                return
                        up += len(data)
                        self._slow(len(data))
                        if faults.rate_up:
                            time.sleep(len(data) / faults.rate_up)
                        server.sendall(data)
                    else:
                        limit = faults.reset_after_down
                        if in_get and limit is not None and down + len(data) > limit:
                            if faults.take_reset():
                                client.sendall(data[: max(0, limit - down)])
                                _reset(client)
                                return
                            in_get = False
                        down += len(data)
                        self._slow(len(data))
                        client.sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.close()

    def _slow(self, size: int) -> None:
        if self.faults.rate:
            time.sleep(size / self.faults.rate)


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: linger on, timeout 0."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def fault_proxy(target_url: str, faults: Faults | None = None) -> Iterator[FaultProxy]:
    """A proxy in front of ``http://host:port``, closed afterwards."""
    host, _, port = target_url.removeprefix("http://").rstrip("/").partition(":")
    proxy = FaultProxy((host, int(port)), faults)
    try:
        yield proxy
    finally:
        proxy.close()

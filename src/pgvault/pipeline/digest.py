"""Size + sha256 of what goes to storage, computed on write and checked on every read."""

from __future__ import annotations

import hashlib

from pgvault.errors import IntegrityError
from pgvault.pipeline.stream import Readable, Reader


class HashingReader(Reader):
    """Passes bytes through unchanged while counting them and hashing them."""

    def __init__(self, source: Readable) -> None:
        super().__init__()
        self._source = source
        self._hash = hashlib.sha256()
        self.size = 0

    def read_chunk(self, size: int) -> bytes:
        data = self._source.read(size)
        if data:
            self._hash.update(data)
            self.size += len(data)
        return data

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class VerifyingReader(Reader):
    """Passes bytes through and raises IntegrityError unless size and sha256 match at EOF."""

    def __init__(self, source: Readable, *, size: int, sha256: str, what: str) -> None:
        super().__init__()
        self._source = source
        self._hash = hashlib.sha256()
        self._expected_size = size
        self._expected_sha256 = sha256
        self._what = what
        self.size = 0
        self.verified = False

    def read_chunk(self, size: int) -> bytes:
        data = self._source.read(size)
        if data:
            self._hash.update(data)
            self.size += len(data)
            if self.size > self._expected_size:
                raise IntegrityError(
                    f"{self._what}: longer than the {self._expected_size} bytes recorded"
                )
            return data
        if not self.verified:
            self._check()
        return b""

    def _check(self) -> None:
        if self.size != self._expected_size:
            raise IntegrityError(
                f"{self._what}: {self.size} bytes stored, {self._expected_size} recorded "
                "(truncated or damaged)"
            )
        if self._hash.hexdigest() != self._expected_sha256:
            raise IntegrityError(f"{self._what}: sha256 does not match the manifest (damaged)")
        self.verified = True

"""Byte stores behind one interface; ``open_storage`` picks the backend from a URL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pgvault.errors import ConfigError

if TYPE_CHECKING:
    from pgvault.storage.base import Storage
    from pgvault.storage.s3 import S3Options


def open_storage(url: str, s3: S3Options | None = None) -> Storage:
    """The store ``url`` names: ``file:///abs/path`` or a path, ``s3://bucket/prefix``, ``memory://``.

    Backends are imported only when chosen, so a file repository never loads boto3.
    """
    if "://" not in url:
        from pgvault.storage.local import LocalStorage

        return LocalStorage(Path(url).expanduser())
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"file repository URL must be file:///absolute/path, not host {parts.netloc!r}"
            )
        from pgvault.storage.local import LocalStorage

        return LocalStorage(Path(unquote(parts.path)))
    if scheme == "s3":
        if "@" in parts.netloc:
            raise ConfigError(
                "s3 repository URL must not hold credentials; use the AWS environment or profile"
            )
        if not parts.netloc:
            raise ConfigError("s3 repository URL needs a bucket: s3://bucket/prefix")
        from pgvault.storage.s3 import S3Options, S3Storage

        return S3Storage(parts.netloc, unquote(parts.path), s3 or S3Options())
    if scheme == "memory":
        from pgvault.storage.memory import MemoryStorage

        return MemoryStorage()
    raise ConfigError(
        f"unsupported repository scheme {scheme!r}: use a path, file://, s3:// or memory://"
    )

"""Byte stores behind one interface; ``open_storage`` picks the backend from a URL."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote, urlsplit

from pgvault.errors import ConfigError

if TYPE_CHECKING:
    from pgvault.storage.base import Storage
    from pgvault.storage.s3 import S3Options

FORMS = "file:///absolute/path or s3://bucket/prefix"

# S3's rules for bucket names (general purpose buckets): 3-63 characters of lowercase
# letters, digits, dots and hyphens, a letter or digit at each end, no "..", not an IPv4
# address, none of the reserved prefixes. Access point and directory bucket aliases
# (-s3alias, --ol-s3, --x-s3) obey the same alphabet and stand where a bucket name does.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_SCHEME_LIKE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)


class RepoLocation(NamedTuple):
    """A repository URL taken apart: ``kind`` file (``path``), s3 (``bucket``, ``prefix``)
    or memory."""

    kind: str
    path: str = ""
    bucket: str = ""
    prefix: str = ""


def parse_repo(url: str) -> RepoLocation:
    """Where ``url`` points, or ConfigError naming what is wrong with it (one line).

    Accepted: ``file:///absolute/path`` (or ``file://localhost/...``), an absolute path
    (``/srv/backups``, ``~/backups``), ``s3://bucket`` or ``s3://bucket/prefix``, and
    ``memory://`` (tests). Anything else is refused rather than guessed at: a relative
    path or a mistyped scheme (``s3:/bucket``, ``file:relative``) used to become a
    folder in the current directory, and a backup "succeeded" there.
    """
    problem = _problem(url)
    if isinstance(problem, RepoLocation):
        return problem
    raise ConfigError(f"repository {_shown(url)} {problem}")


def _problem(url: str) -> RepoLocation | str:
    if not url.strip():
        return f"is empty; give {FORMS}"
    if url != url.strip():
        return "has spaces at its start or end"
    if "://" not in url:
        return _not_a_url(url)
    scheme, _, rest = url.partition("://")
    if scheme.lower() in ("file", "s3", "memory") and scheme != scheme.lower():
        return f"has its scheme in upper case: write {scheme.lower()}://{rest}"
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        return f"is not a well-formed URL ({exc}); use {FORMS}"
    if scheme == "memory":
        return RepoLocation("memory")
    if scheme not in ("file", "s3"):
        return f"has an unsupported scheme {scheme!r}: use {FORMS}"
    if parts.query or url.endswith("?"):
        return ("has a query string ('?...'), which pgvault does not read; settings go in "
                "the config file or PGVAULT_* variables (e.g. [s3] endpoint_url, region)")
    if parts.fragment or "#" in url:
        return "has a fragment ('#...'); write '#' in a path as %23"
    if scheme == "file":
        return _file(parts.netloc, parts.path)
    return _s3(parts.netloc, parts.path)


def _not_a_url(url: str) -> RepoLocation | str:
    """A plain path (absolute only), or a URL missing its '//' (said so, with the fix)."""
    if url.startswith("/"):
        return RepoLocation("file", path=url)
    if url.startswith("~"):
        expanded = os.path.expanduser(url)
        if expanded.startswith("/"):
            return RepoLocation("file", path=expanded)
        return (f"starts with {url.split('/', 1)[0]!r}, which is no home folder here; give an "
                "absolute path")
    scheme_like = _SCHEME_LIKE.fullmatch(url)
    if scheme_like and scheme_like[1].lower() in ("s3", "file", "memory"):
        scheme, rest = scheme_like[1].lower(), scheme_like[2]
        if scheme == "s3":
            fix = f"s3://{rest.lstrip('/')}" if rest.strip("/") else "s3://bucket/prefix"
        elif scheme == "file" and rest.startswith("/"):
            fix = "file:///" + rest.lstrip("/")
        elif scheme == "file":
            fix = "file:///absolute/path (a relative path is not allowed)"
        else:
            fix = "memory://"
        return f"is not a well-formed URL (no '//' after '{scheme_like[1]}:'); did you mean {fix}?"
    if scheme_like and "/" not in scheme_like[1]:
        return f"has an unsupported scheme {scheme_like[1]!r} (and no '//'): use {FORMS}"
    return (f"is a relative path (it would depend on the current directory); give an "
            f"absolute one: file://{os.path.abspath(url)}")


def _file(host: str, path: str) -> RepoLocation | str:
    if host not in ("", "localhost"):
        hint = " ('~' is not expanded in a URL)" if host.startswith("~") else ""
        return f"names a host ({host!r}), which a file URL cannot: write file:///absolute/path{hint}"
    if not path.startswith("/"):
        return "has no absolute path: write file:///absolute/path"
    return RepoLocation("file", path=unquote(path))


def _s3(netloc: str, path: str) -> RepoLocation | str:
    if "@" in netloc:
        return "holds credentials, which an s3 URL must not: use the AWS environment or profile"
    if not netloc:
        return "names no bucket: write s3://bucket/prefix"
    if ":" in netloc:
        return ("names a port, which an s3 URL cannot: another endpoint goes in [s3] "
                "endpoint_url (PGVAULT_S3__ENDPOINT_URL)")
    problem = bucket_problem(netloc)
    if problem:
        return f"has an invalid bucket name {netloc!r}: {problem}"
    prefix = unquote(path).strip("/")
    segments = prefix.split("/") if prefix else []
    if any(segment in ("", ".", "..") for segment in segments):
        return f"has an empty, '.' or '..' segment in its prefix {prefix!r}"
    if "\0" in prefix:
        return "has a NUL character in its prefix"
    return RepoLocation("s3", bucket=netloc, prefix=prefix)


def bucket_problem(name: str) -> str | None:
    """Why ``name`` breaks S3's bucket naming rules; None when it keeps them."""
    if not 3 <= len(name) <= 63:
        return f"S3 bucket names have 3 to 63 characters, not {len(name)}"
    if not _BUCKET.fullmatch(name):
        return ("S3 bucket names hold only lowercase letters, digits, '.' and '-', and begin "
                "and end with a letter or digit")
    if ".." in name:
        return "S3 bucket names have no two dots in a row"
    if _IPV4.fullmatch(name):
        return "S3 bucket names must not look like an IP address"
    reserved = next((p for p in _RESERVED_PREFIXES if name.startswith(p)), None)
    if reserved:
        return f"S3 reserves the prefix {reserved!r}"
    return None


def _shown(url: str) -> str:
    """The URL for an error message; anything before an '@' might be a secret."""
    if "@" in url:
        scheme, sep, rest = url.partition("://")
        return repr(f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if sep else "***")
    return repr(url)


def open_storage(url: str, s3: S3Options | None = None) -> Storage:
    """The store ``url`` names: ``file:///abs/path`` or an absolute path, ``s3://bucket/prefix``,
    ``memory://`` (see ``parse_repo``).

    Backends are imported only when chosen, so a file repository never loads boto3.
    """
    where = parse_repo(url)
    if where.kind == "file":
        from pgvault.storage.local import LocalStorage

        return LocalStorage(Path(where.path))
    if where.kind == "s3":
        from pgvault.storage.s3 import S3Options, S3Storage

        return S3Storage(where.bucket, where.prefix, s3 or S3Options())
    from pgvault.storage.memory import MemoryStorage

    return MemoryStorage()

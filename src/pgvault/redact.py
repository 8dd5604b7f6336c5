"""Scrub secrets from any text before it is printed, logged, sent or stored.

``config`` registers every secret it reads (database passwords, AWS secret keys and session
tokens, the age passphrase, notification URLs, SSE-C keys); ``scrub`` replaces each of them,
in plain and URL-encoded forms, with ``***``, and also blanks passwords in URLs and
secret-looking query parameters it was never told about. The CLI routes stdout and stderr
through ``ScrubbingWriter``, so no code path can print a registered secret by mistake.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

MASK = "***"
MIN_LENGTH = 4
"""Shorter values are not scrubbed: masking 'ab' everywhere would garble every message."""

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# scheme://user:password@host -> scheme://user:***@host, for URLs nobody registered.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)(?P<pw>[^/\s@]+)@")
# password=..., X-Amz-Signature=..., token=... in URLs and key=value conninfo strings.
_PARAM = re.compile(
    # The lookahead (every alternative's first letter) lets most positions fail at once,
    # which makes scrubbing a large page (the console's) about 4x faster.
    r"(?P<head>\b(?=[pstax])(?:password|passwd|pass|secret|token|access_token|api_key|apikey|sig|"
    r"signature|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|sslpassword)"
    r"\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&'\"]+)",
    re.IGNORECASE,
)


def _forms(secret: str) -> set[str]:
    """The secret as it may appear: plain, URL-encoded (both styles), JSON-escaped."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret)}
    forms.add(secret.replace("\\", "\\\\").replace('"', '\\"'))
    return {form for form in forms if len(form) >= MIN_LENGTH}


def register(*values: str | None) -> None:
    """Remember secrets so ``scrub`` removes them from everything printed from now on."""
    global _pattern
    fresh = {v for v in values if v and len(v) >= MIN_LENGTH and v not in _secrets}
    if not fresh:
        return
    with _lock:
        _secrets.update(fresh)
        forms = set().union(*(_forms(s) for s in _secrets))
        # Longest first, so a secret containing another is masked whole.
        _pattern = re.compile("|".join(re.escape(f) for f in sorted(forms, key=len,
                                                                     reverse=True)))


def register_url(url: str | None) -> None:
    """A URL that is secret as a whole (webhooks) and the secret parts inside it."""
    if not url:
        return
    register(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    # Webhook tokens live in long path segments and in the query.
    tokens = [segment for segment in parts.path.split("/") if len(segment) >= 16]
    register(parts.password, parts.query or None, *tokens)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Secrets registered inside the block are forgotten after it (one in-process run of
    the CLI must not mask, or hide from children, what the next run prints)."""
    global _pattern
    with _lock:
        saved = set(_secrets), _pattern
    try:
        yield
    finally:
        with _lock:
            _secrets.clear()
            _secrets.update(saved[0])
            _pattern = saved[1]


def forget_all() -> None:
    """Drop every registered secret (tests that plant several sets in one process)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def scrub(text: str) -> str:
    """``text`` with every registered secret and every URL password replaced by ``***``."""
    if not text:
        return text
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _USERINFO.sub(lambda m: m["head"] + MASK + "@", text)
    return _PARAM.sub(lambda m: m["head"] + MASK, text)


def contains_secret(text: str) -> bool:
    """Whether ``text`` holds a registered secret (in any of its forms)."""
    pattern = _pattern
    return bool(text) and pattern is not None and pattern.search(text) is not None


class ScrubbingWriter(io.TextIOBase):
    """A text stream that scrubs whole lines before passing them on.

    Text is held until a newline or a flush, so a secret split across two writes is
    still seen whole; a progress line ending in no newline goes out at its flush.
    """

    def __init__(self, target: Any) -> None:
        super().__init__()
        self._target = target
        self._partial = ""
        self._write_lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._target, "encoding", "utf-8"))

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._target, "errors", None)

    def isatty(self) -> bool:
        return bool(self._target.isatty())

    def fileno(self) -> int:
        return int(self._target.fileno())

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._write_lock:
            data = self._partial + text
            head, newline, self._partial = data.rpartition("\n")
            if newline:
                self._target.write(scrub(head + newline))
        return len(text)

    def flush(self) -> None:
        with self._write_lock:
            if self._partial:
                self._target.write(scrub(self._partial))
                self._partial = ""
        self._target.flush()


class ScrubbingFilter(logging.Filter):
    """A logging filter that scrubs each record's final message (and drops its args)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True

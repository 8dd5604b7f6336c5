"""age encryption as a pipeline stage: the standard format (``age -d`` reads it), streamed.

pyrage's ``encrypt_io``/``decrypt_io`` push from a reader into a writer in constant memory
(measured: 500 MB through either in about 10 MB of RSS). The pipeline pulls instead, so each
stage runs pyrage in a thread that hands its output over through a small bounded queue.

Only public recipients are ever recorded; identities (secret keys) are read at restore time
from an identity file or, in passphrase mode, from the repository's passphrase-wrapped key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgvault.errors import (
    ConfigError,
    DecryptionError,
    IntegrityError,
    PgvaultError,
)
from pgvault.pipeline.pump import Pump, pushing
from pgvault.pipeline.stream import Readable, Reader

if TYPE_CHECKING:
    from pgvault.model import StageSpec

AGE_MAGIC = b"age-encryption.org/v1"
ARMOR_MAGIC = b"-----BEGIN AGE ENCRYPTED FILE-----"
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")


# ---------------------------------------------------------------- recipients

def canonical_recipient(text: str) -> str:
    """A recipient as manifests record it: ``age1...`` as is, an SSH key without its comment.

    Raises ConfigError (naming the recipient, which is public) when age cannot use it.
    """
    text = text.strip()
    parts = text.split()
    if parts and parts[0] in SSH_KEY_TYPES and len(parts) >= 2:
        text = f"{parts[0]} {parts[1]}"
    parse_recipient(text)
    return text


def parse_recipient(text: str) -> Any:
    """The pyrage recipient for ``age1...`` or ``ssh-ed25519 AAAA...``/``ssh-rsa AAAA...``."""
    import pyrage

    try:
        if text.startswith("age1"):
            return pyrage.x25519.Recipient.from_str(text)
        if text.split(" ", 1)[0] in SSH_KEY_TYPES:
            return pyrage.ssh.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise ConfigError(f"invalid age recipient {describe_recipient(text)!r}: {exc}") from None
    raise ConfigError(
        f"invalid age recipient {text[:40]!r}: use an age1... public key or an ssh-ed25519/"
        "ssh-rsa public key (pgvault keygen prints one)"
    )


def describe_recipient(text: str) -> str:
    """Short form for messages: ``age1...`` as is, SSH keys by their SHA256 fingerprint."""
    parts = text.split()
    if len(parts) >= 2 and parts[0] in SSH_KEY_TYPES:
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except ValueError:
            return parts[0] + " (unreadable key)"
        digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        return f"{parts[0]} SHA256:{digest}"
    return text


def recipients_from_text(text: str) -> list[str]:
    """Recipients in age's ``-R`` file format: one per line, ``#`` comments, blank lines."""
    lines = (line.strip() for line in text.splitlines())
    return [canonical_recipient(line) for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------- identities

@dataclass
class Identities:
    """Secret keys that may open an artifact, and what to call them in messages."""

    keys: list[Any]
    recipients: list[str | None]
    """The public recipient of each key where it can be derived (X25519), else None."""
    source: str


def parse_identities(data: bytes, source: str, passphrase: str | None = None) -> Identities:
    """Identities from an age identity file, an OpenSSH private key, or a passphrase-wrapped
    age identity file (``age -p``), which ``passphrase`` opens. Never echoes key material.
    """
    import pyrage

    if data.lstrip().startswith((AGE_MAGIC, ARMOR_MAGIC)):
        if passphrase is None:
            raise ConfigError(f"{source} is passphrase-protected; set PGVAULT_AGE_PASSPHRASE "
                              "(or PGVAULT_AGE_PASSPHRASE_FILE) to open it")
        try:
            data = pyrage.passphrase.decrypt(data, passphrase)
        except pyrage.DecryptError:
            raise DecryptionError(f"the passphrase does not open {source}") from None
    if b"PRIVATE KEY-----" in data:
        try:
            return Identities([pyrage.ssh.Identity.from_buffer(data)], [None], source)
        except pyrage.IdentityError as exc:
            raise ConfigError(f"{source} is not a usable SSH private key "
                              f"(passphrase-protected SSH keys are not supported): {exc}") from None
    keys: list[Any] = []
    recipients: list[str | None] = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("AGE-SECRET-KEY-1"):
            raise ConfigError(f"{source}: line {number} is not an AGE-SECRET-KEY-1... identity")
        try:
            key = pyrage.x25519.Identity.from_str(line)
        except pyrage.IdentityError as exc:
            raise ConfigError(f"{source}: line {number} is not a valid identity: {exc}") from None
        keys.append(key)
        recipients.append(str(key.to_public()))
    if not keys:
        raise ConfigError(f"{source} holds no identity")
    return Identities(keys, recipients, source)


def load_identity_file(path: str, passphrase: str | None = None) -> Identities:
    """Identities from the file at ``path`` (see ``parse_identities``)."""
    source = f"the identity in {path}"
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read identity file {path}: {exc.strerror}") from None
    return parse_identities(data, source, passphrase)


def new_identity(now: datetime | None = None) -> tuple[str, str]:
    """A fresh X25519 identity as age-keygen writes it, and its public recipient."""
    import pyrage

    key = pyrage.x25519.Identity.generate()
    recipient = str(key.to_public())
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"# created: {created}\n# public key: {recipient}\n{key}\n"
    return text, recipient


def write_identity_file(path: str, text: str) -> None:
    """Write ``text`` to a new file of mode 0600; an existing file is never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; pgvault never overwrites a key file") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode is filtered by the umask
        handle.write(text)


def wrap_identity(text: str, passphrase: str) -> bytes:
    """``text`` (an identity file) wrapped with ``passphrase`` as ``age -p`` does (scrypt)."""
    import pyrage

    return bytes(pyrage.passphrase.encrypt(text.encode(), passphrase))


def unwrap_identity(wrapped: bytes, passphrase: str, source: str, *,
                    refused: str) -> Identities:
    """The identities inside a passphrase-wrapped identity file; ``refused`` when it won't open."""
    import pyrage

    try:
        return parse_identities(pyrage.passphrase.decrypt(wrapped, passphrase), source)
    except pyrage.DecryptError:
        raise DecryptionError(refused) from None


@dataclass
class Keyring:
    """What restore and verify may use to decrypt; loaded only when an artifact needs it.

    ``repository_key`` opens the repository's passphrase-wrapped identity: the composition
    root (vault.py) supplies it, so this stage never reaches into a repository itself.
    """

    identity_file: str | None = None
    passphrase: str | None = None
    repository_key: Callable[[], Identities] | None = None
    _loaded: dict[str, Identities] = field(default_factory=dict, repr=False)

    def for_stage(self, stage: StageSpec) -> Identities:
        """Every identity that could open an artifact encrypted as ``stage`` says."""
        found: list[Identities] = []
        if self.identity_file:
            if "file" not in self._loaded:
                self._loaded["file"] = load_identity_file(self.identity_file, self.passphrase)
            found.append(self._loaded["file"])
        if stage.passphrase and self.passphrase and self.repository_key is not None:
            if "passphrase" not in self._loaded:
                self._loaded["passphrase"] = self.repository_key()
            found.append(self._loaded["passphrase"])
        return Identities(
            keys=[k for ids in found for k in ids.keys],
            recipients=[r for ids in found for r in ids.recipients],
            source=" or ".join(ids.source for ids in found) or "no identity",
        )


class AgeEncoder(Pump):
    """Reads plaintext and yields one age file encrypted to ``recipients``."""

    def __init__(self, source: Readable, recipients: Sequence[str]) -> None:
        import pyrage

        parsed = [parse_recipient(r) for r in recipients]
        if not parsed:
            raise ConfigError("age encryption needs at least one recipient")

        def work(reader: Any, writer: Any) -> None:
            pyrage.encrypt_io(reader, writer, parsed)

        def translate(exc: BaseException) -> BaseException:
            return PgvaultError(f"age encryption failed: {exc}")

        super().__init__(pushing(source, work, translate))


class AgeDecoder(Pump):
    """Reads an age file and yields its plaintext; fails at once if no identity matches."""

    def __init__(self, source: Readable, keys: list[Any], *,
                 no_match: Callable[[], PgvaultError], what: str) -> None:
        import pyrage

        def work(reader: Any, writer: Any) -> None:
            pyrage.decrypt_io(reader, writer, keys)

        def translate(exc: BaseException) -> BaseException:
            if isinstance(exc, pyrage.DecryptError) and "no matching keys" in str(exc).lower():
                return no_match()
            if isinstance(exc, pyrage.DecryptError):
                return IntegrityError(f"{what}: not a readable age file ({exc})")
            return IntegrityError(f"{what}: the age stream is damaged or truncated "
                                  f"(authentication failed: {exc})")

        super().__init__(pushing(source, work, translate, drain=True))
        # The header is read first: a wrong identity fails here, before any restore starts.
        if not self._done:
            self._next()


def decoder(source: Readable, stage: StageSpec, keyring: Keyring | None, what: str) -> Reader:
    """The decoder of one age stage, or DecryptionError naming the recipients it needs."""
    recipients = list(stage.recipients or ())
    wanted = ", ".join(describe_recipient(r) for r in recipients) or "unknown recipients"
    if stage.passphrase:
        wanted += " (and the repository passphrase)"
    identities = keyring.for_stage(stage) if keyring is not None else None
    if identities is None or not identities.keys:
        raise DecryptionError(
            f"{what} is encrypted for recipients {wanted}; no identity was given "
            "(--identity-file, PGVAULT_AGE_IDENTITY_FILE or PGVAULT_AGE_PASSPHRASE)")

    def no_match() -> PgvaultError:
        # Our own key is among the recipients yet age found no match: the header is damaged.
        if any(r in recipients for r in identities.recipients if r):
            return IntegrityError(f"{what}: the age header is damaged (an identity listed as a "
                                  "recipient cannot open it)")
        return DecryptionError(
            f"{what} is encrypted for recipients {wanted}; {identities.source} matches none")

    known = [r for r in identities.recipients if r]
    if len(known) == len(identities.keys) and recipients and not set(known) & set(recipients):
        raise no_match()  # every public key is known and none is listed: read nothing
    return AgeDecoder(source, identities.keys, no_match=no_match, what=what)

"""The composition root: the wired parts one database's runs use, built once and held.

``Vault.open(settings)`` decides, in one place, what the rest of pgvault used to decide in
several: which repository (storage and catalog), which stages a new artifact gets (with
explicit levels), which identities may decrypt (the keyring), the retention policy, how
old a lock must be to count as stale, and where events go. It does no work itself: the
jobs (ops/jobs.py) and the commands take what they need from it.

The parts that cost an import or touch the repository (stages, keyring, policy, events)
are built on first use, so `list` never imports age or the notifiers, and a repository
in passphrase mode gets its key object only once a backup actually needs the stage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pgvault import logs
from pgvault.catalog import PASSPHRASE_IDENTITY, Catalog
from pgvault.errors import AlreadyExists, ConfigError, DecryptionError, NotFound
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    from pgvault.config import Settings
    from pgvault.events import Fanout
    from pgvault.metrics import Metrics
    from pgvault.model import Artifact, StageSpec
    from pgvault.pipeline.age import Identities, Keyring
    from pgvault.pipeline.stream import Readable
    from pgvault.retention import Duration, Policy
    from pgvault.storage.s3 import S3Options

log = logs.get("vault")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def open_repository(settings: Settings) -> Storage:
    """The storage ``settings.repo`` names, with the [s3] options for an S3 repository."""
    from pgvault.storage import open_storage

    options = s3_options(settings) if settings.location.kind == "s3" else None
    return open_storage(settings.repo, options)


def s3_options(settings: Settings) -> S3Options:
    """S3Options for the storage layer, built from the [s3] section."""
    from pgvault.storage.s3 import S3Options

    s3 = settings.s3
    if not s3.verify_tls:
        log.warning("TLS certificate verification for the S3 endpoint is off "
                    "(s3.verify_tls = false): anyone on the network path can read and alter "
                    "backups in transit")
    lock = s3.object_lock
    return S3Options(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        path_style=s3.path_style,
        sse=None if s3.sse in ("none", "sse-c") else s3.sse,
        kms_key_id=s3.kms_key_id,
        verify_tls=s3.verify_tls,
        part_size=s3.part_size_mb << 20,
        max_concurrency=s3.max_concurrency,
        sse_customer_key=settings.secrets.sse_c_key if s3.sse == "sse-c" else None,
        object_lock_mode=lock.mode.upper() if lock else None,
        object_lock_days=(lock.days or 0) if lock else 0,
        object_lock_until=_policy_hold(settings) if lock and lock.days is None else None,
        io_timeout=settings.io_timeout_seconds,
        credentials=settings.repository_credentials() or settings.secrets.aws_credentials(),
    )


def _policy_hold(settings: Settings) -> Callable[[datetime], datetime | None]:
    """The Object Lock date the repository's own retention policy gives a written object."""
    import functools

    import msgspec

    from pgvault.retention import Policy, hold_after_write

    policy = Policy.from_mapping(msgspec.structs.asdict(settings.retention))
    if hold_after_write(policy, _utcnow()) is None:
        raise ConfigError("s3 object_lock needs days = N: the retention policy keeps by count "
                          "only (keep_last), which gives no date to lock until")
    return functools.partial(hold_after_write, policy)


@dataclass(frozen=True)
class Vault:
    """Everything a run against one repository and one database's settings is wired from."""

    settings: Settings
    storage: Storage
    catalog: Catalog
    lock_stale_after: timedelta
    metrics: Metrics | None = None
    """The process's metric families (the daemon's); None: built when publishing."""
    cancel: threading.Event | None = None
    """Set to abort a running backup cleanly (no manifest, uploads aborted)."""
    clock: Callable[[], datetime] = field(default=_utcnow)

    @classmethod
    def open(cls, settings: Settings, *, storage: Storage | None = None,
             metrics: Metrics | None = None, cancel: threading.Event | None = None,
             clock: Callable[[], datetime] | None = None) -> Vault:
        """Wire the parts for ``settings``; ``storage`` shares an opened repository."""
        storage = storage if storage is not None else open_repository(settings)
        return cls(settings=settings, storage=storage, catalog=Catalog(storage),
                   lock_stale_after=timedelta(hours=settings.lock_stale_after_hours),
                   metrics=metrics, cancel=cancel, clock=clock or _utcnow)

    def repository(self, name: str) -> Vault:
        """The vault of the `[[repos]]` entry ``name``: its storage, catalog and policy."""
        return Vault.open(self.settings.repository(name), metrics=self.metrics,
                          cancel=self.cancel, clock=self.clock)

    @property
    def copies(self) -> list[str]:
        """The `[[repos]]` this repository's backups are copied to (every other entry)."""
        return [e.name for e in self.settings.repos if e.url != self.settings.repo]

    # -- what a new artifact becomes ----------------------------------------------------

    @cached_property
    def stages(self) -> list[StageSpec]:
        """The stages the settings give a new artifact (the first use may create the
        repository's passphrase key)."""
        return self.stages_for()

    def stages_for(self, algorithm: str | None = None,
                   level: int | None = None) -> list[StageSpec]:
        """The stages of a new artifact, a command's --compression/--level overriding."""
        from pgvault import pipeline

        comp = self.settings.compression
        recipients = list(self.recipients)
        if self.settings.encryption.passphrase:
            passphrase = self.passphrase
            if not passphrase:
                raise ConfigError("encryption.passphrase is on, but PGVAULT_AGE_PASSPHRASE "
                                  "(or PGVAULT_AGE_PASSPHRASE_FILE) is not set")
            recipients += [r for r in self._repository_key(create=True).recipients if r]
        stages = pipeline.configured_stages(algorithm or comp.algorithm,
                                            comp.level if level is None else level,
                                            comp.threads, recipients=recipients,
                                            passphrase=self.settings.encryption.passphrase)
        if self.requires_encryption and not any(s.name == "age" for s in stages):
            raise ConfigError(f"repository {self.settings.repository_name} requires encrypted "
                              "backups ([[repos]] require_encrypted = true): set "
                              "encryption.recipients or encryption.passphrase")
        return stages

    @property
    def requires_encryption(self) -> bool:
        """Whether this `[[repos]]` entry refuses anything not age-encrypted."""
        name = self.settings.repository_name
        return any(e.name == name and e.require_encrypted for e in self.settings.repos)

    @cached_property
    def recipients(self) -> tuple[str, ...]:
        """The configured age recipients (canonical); the passphrase key's not among them."""
        written = self.settings.secrets.age_recipients
        if not written:
            return ()  # without importing the age stage: most backups are not encrypted
        from pgvault.pipeline.age import canonical_recipient

        return tuple(canonical_recipient(r) for r in written)

    def store_artifact(self, key: str, source: Readable, *, name: str, format: str,
                       stages: list[StageSpec] | None = None, **extra: Any) -> Artifact:
        """Store one artifact in this repository through ``stages`` (default: the vault's);
        the one ``artifacts.store_artifact`` does the encoding, hashing and put."""
        from pgvault.artifacts import store_artifact

        return store_artifact(self.storage, key, source,
                              self.stages if stages is None else stages, name=name,
                              format=format, **extra)

    # -- what may decrypt -------------------------------------------------------------

    @cached_property
    def passphrase(self) -> str | None:
        """The repository passphrase (PGVAULT_AGE_PASSPHRASE or its _FILE only)."""
        return self.settings.secrets.age_passphrase

    @cached_property
    def keyring(self) -> Keyring:
        """The identities restore, verify and wal-fetch may use: the settings' file, the
        passphrase's repository key (opened only when an artifact needs it)."""
        from pgvault.pipeline.age import Keyring

        return Keyring(identity_file=self.settings.encryption.identity_file,
                       passphrase=self.passphrase,
                       repository_key=lambda: self._repository_key(create=False))

    def keyring_with(self, identity_file: str | None) -> Keyring:
        """The keyring, with a command's --identity-file instead of the configured one."""
        return replace(self.keyring, identity_file=identity_file) if identity_file else \
            self.keyring

    def _repository_key(self, *, create: bool) -> Identities:
        passphrase = self.passphrase
        if not passphrase:
            raise ConfigError("passphrase mode needs PGVAULT_AGE_PASSPHRASE "
                              "(or PGVAULT_AGE_PASSPHRASE_FILE)")
        return passphrase_identity(self.storage, passphrase, create=create)

    # -- retention, events ------------------------------------------------------------

    @cached_property
    def policy(self) -> Policy:
        """The [retention] policy (a bad one raises ConfigError when first asked for)."""
        import msgspec

        from pgvault.retention import Policy

        return Policy.from_mapping(msgspec.structs.asdict(self.settings.retention))

    @cached_property
    def recovery_window(self) -> Duration | None:
        """[physical] recovery_window as a retention Duration (None when unset)."""
        from pgvault.retention import Duration

        text = self.settings.physical.recovery_window
        if not text:
            return None
        try:
            return Duration.parse(text)
        except ValueError as exc:
            raise ConfigError(f"physical.recovery_window: {exc}") from None

    @cached_property
    def events(self) -> Fanout:
        """The [notify] sinks; a failed delivery is logged and counted, never raised."""
        from pgvault.events import Event, Sink
        from pgvault.sinks import fanout_for

        metrics = self.metrics

        def failed(sink: Sink, event: Event, reason: str) -> None:
            log.warning("notification %s of %s via %s failed: %s", event.kind, event.database,
                        sink.name, reason)
            if metrics is not None:
                metrics.notification_failed(event.database, sink.name)

        return fanout_for(self.settings.notify, on_failure=failed)


def passphrase_identity(storage: Storage, passphrase: str, *, create: bool) -> Identities:
    """The repository's passphrase-wrapped identity (an ``age -p`` file), opened.

    With ``create`` a repository without one gets a new identity, wrapped with scrypt;
    two hosts creating it at once end up sharing the first one stored.
    """
    from pgvault.pipeline.age import new_identity, parse_identities, unwrap_identity, wrap_identity

    source = f"the repository key {PASSPHRASE_IDENTITY} (opened with the passphrase)"
    for _ in range(2):
        try:
            wrapped = storage.read_bytes(PASSPHRASE_IDENTITY)
        except NotFound:
            if not create:
                raise DecryptionError(
                    f"the repository has no passphrase key {PASSPHRASE_IDENTITY}") from None
            text, _recipient = new_identity()
            try:
                storage.create(PASSPHRASE_IDENTITY, wrap_identity(text, passphrase))
            except AlreadyExists:
                continue  # another host made one first: use that one
            return parse_identities(text.encode(), source)
        return unwrap_identity(
            wrapped, passphrase, source,
            refused=f"the passphrase (PGVAULT_AGE_PASSPHRASE) does not open {storage.url}/"
                    f"{PASSPHRASE_IDENTITY}: it is not the passphrase this repository was set "
                    "up with")
    raise DecryptionError(f"cannot read {PASSPHRASE_IDENTITY}")  # pragma: no cover

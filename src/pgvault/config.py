"""The one place that reads the environment and config files.

Precedence, highest first: command-line flag > environment > TOML file > default.
``load(flags, environ, files)`` reads everything once and returns frozen ``Settings``:
the values, the secrets the environment holds (read eagerly, ``settings.secrets``) and a
read-only snapshot of the environment (``settings.environ``) for child processes.
Everything else in pgvault receives these plain values; nothing else reads or writes
``os.environ``, and this module never touches the process-wide redactor itself: the
entry point registers ``settings.secrets.scrub_values`` (see ``redactions``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import stat
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from pgvault import redact
from pgvault.errors import ConfigError, UsageError
from pgvault.pg.conninfo import ConnInfo

if typing.TYPE_CHECKING:
    from pgvault.storage import RepoLocation

log = logging.getLogger("pgvault")

# Variables whose value may instead be read from the file named by VAR_FILE.
SECRET_VARIABLES = (
    "DATABASE_URL",
    "DIRECT_URL",
    "PGPASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def default_repo(environ: Mapping[str, str] | None = None) -> str:
    """~/.local/share/pgvault/repo, or under XDG_DATA_HOME (``environ``: the process's own
    environment when None, for Settings built in code)."""
    environ = os.environ if environ is None else environ
    # The XDG spec says to ignore a relative XDG_DATA_HOME; as_uri() escapes '#', '?', '%'.
    data_home = environ.get("XDG_DATA_HOME") or ""
    if not os.path.isabs(data_home):
        data_home = _expanduser("~/.local/share", environ)
    folder = Path(data_home, "pgvault", "repo")
    return folder.as_uri() if folder.is_absolute() else str(folder)


class Secret:
    """A secret setting: its repr and str never show the value (as pydantic's SecretStr did)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __len__(self) -> int:
        return len(self._value)


def _dec_hook(kind: type, value: Any) -> Any:
    """msgspec's conversion of the types it does not know itself."""
    if kind is Secret:
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            return Secret(value)
        raise TypeError(f"Expected `str`, got `{type(value).__name__}`")
    raise NotImplementedError(f"cannot convert to {kind!r}")


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A table of the config file; unknown keys are errors."""


class ObjectLockSettings(Section, kw_only=True):
    """S3 Object Lock retention applied to every object written (ransomware protection).

    Without ``days`` the date follows the repository's retention policy (docs/copies.md);
    ``days`` fixes it at N days from the write instead (needed when the policy keeps by
    count alone). Prune extends the dates of the backups it keeps either way.
    """

    mode: Literal["governance", "compliance"] = "governance"
    days: Annotated[int, Meta(ge=1, le=36500)] | None = None


class S3Settings(Section):
    """How to reach an S3-compatible store; credentials come from the AWS_* chain.

    sse = "sse-c" takes its key from PGVAULT_S3_SSE_C_KEY(_FILE) only (base64, 32 bytes).
    """

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    sse: Literal["AES256", "aws:kms", "sse-c", "none"] = "AES256"
    kms_key_id: str | None = None
    verify_tls: bool = True
    # An upload holds up to max_concurrency + 1 parts in memory (25 MiB by default).
    part_size_mb: Annotated[int, Meta(ge=5, le=5120)] = 5
    max_concurrency: Annotated[int, Meta(ge=1, le=64)] = 4
    object_lock: ObjectLockSettings | None = None


class CompressionSettings(Section):
    """How artifacts are compressed before they are stored."""

    algorithm: Literal["zstd", "gzip", "none"] = "zstd"
    level: Annotated[int, Meta(ge=-7, le=22)] | None = None
    threads: Annotated[int, Meta(ge=0, le=64)] = 2


class EncryptionSettings(Section):
    """Client-side age encryption: to public recipients, and/or with a repository passphrase.

    Env: PGVAULT_AGE_RECIPIENTS (comma-separated), PGVAULT_AGE_IDENTITY_FILE. The passphrase
    itself only comes from PGVAULT_AGE_PASSPHRASE or PGVAULT_AGE_PASSPHRASE_FILE.
    """

    recipients: list[str] = field(default_factory=list)
    recipients_file: str | None = None
    identity_file: str | None = None
    passphrase: bool = False


class RetentionSettings(Section):
    """Grandfather-father-son retention; counts are numbers or "unlimited"."""

    keep_last: int | str = 0
    keep_daily: int | str = 7
    keep_weekly: int | str = 4
    keep_monthly: int | str = 3
    keep_yearly: int | str = 0
    keep_within: str | None = None
    timezone: str = "UTC"


class ObjectivesSettings(Section):
    """The recovery objectives that monitoring and restore drills hold backups to."""

    rpo_hours: Annotated[float, Meta(gt=0)] = 24.0
    rto_minutes: Annotated[float, Meta(gt=0)] = 60.0


VerifyLevel = Literal["integrity", "restore", "facts", "assertions", "command"]


class SqlAssertion(Section):
    """One `[[verify.sql]]` check: a query returning one boolean, true when all is well."""

    name: Annotated[str, Meta(min_length=1)]
    query: Annotated[str, Meta(min_length=1)]


class VerifySettings(Section):
    """Restore drills (`pgvault verify`): where to restore, how deep, what to run."""

    server: Secret | None = None  # a server URL; None: an ephemeral local cluster
    level: VerifyLevel | None = None  # None: the deepest level this section allows
    command: str | None = None  # run by `sh -c` with DATABASE_URL/PG* set to the restore
    command_timeout_seconds: Annotated[float, Meta(gt=0)] = 600.0
    sql: list[SqlAssertion] = field(default_factory=list)

    def default_level(self) -> VerifyLevel:
        if self.level is not None:
            return self.level
        return "command" if self.command else "assertions" if self.sql else "facts"


class ScheduleSettings(Section):
    """When `pgvault daemon` runs each job: 5-field cron, @daily-style macros or @every 10m."""

    backup: str = "0 1 * * *"
    verify: str | None = None  # a schedule, "after-backup", or None for no verify job
    freshness: str = "@every 5m"  # how often the RPO objective is checked
    timezone: str = "UTC"
    jitter_seconds: Annotated[int, Meta(ge=0)] = 0
    run_on_start: bool = False
    retries: Annotated[int, Meta(ge=0, le=20)] = 2
    retry_backoff_seconds: Annotated[float, Meta(ge=0)] = 60.0


class DaemonSettings(Section):
    """The daemon process: where it serves HTTP, how many jobs at once, how long to drain."""

    listen: str = "127.0.0.1:9847"
    max_concurrency: Annotated[int, Meta(ge=1, le=32)] = 1
    grace_seconds: Annotated[float, Meta(ge=0)] = 300.0
    max_copies: Annotated[int, Meta(ge=1, le=32)] = 2  # [[repos]] copies running at once


class ConsoleSettings(Section):
    """The web console: `pgvault daemon` serves it on daemon.listen (unless enabled =
    false), `pgvault console` on listen. Beyond loopback it answers only with a token: the
    file token_file names, or PGVAULT_CONSOLE_TOKEN (or its _FILE). Read-only unless
    actions = true (backup, drill, pin, restore into a new database)."""

    enabled: bool = True
    listen: str = "127.0.0.1:9848"
    token_file: str | None = None
    actions: bool = False


class EmailSettings(Section, kw_only=True):
    """Notification e-mail over SMTP."""

    smtp_host: str
    smtp_port: int = 587
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password: Secret | None = None
    sender: str
    to: Annotated[list[str], Meta(min_length=1)]


DEFAULT_EVENTS = ["backup.failed", "verify.failed", "backup.stale", "backup.recovered"]


class NotifySettings(Section):
    """Where events go; every URL is a secret (Secret: never printed)."""

    events: list[str] = field(default_factory=lambda: list(DEFAULT_EVENTS))
    timeout_seconds: Annotated[float, Meta(gt=0, le=120)] = 5.0
    webhook_url: Secret | None = None
    slack_webhook_url: Secret | None = None
    discord_webhook_url: Secret | None = None
    ping_url: Secret | None = None  # healthchecks-style: <url>/start, <url>, <url>/fail
    email: EmailSettings | None = None

    def __post_init__(self) -> None:
        from pgvault.events import EVENT_KINDS

        unknown = [kind for kind in self.events if kind not in EVENT_KINDS and kind != "all"]
        if unknown:
            raise ValueError(f"[events] unknown event {unknown[0]!r} (known: all, "
                             f"{', '.join(EVENT_KINDS)})")


class MetricsSettings(Section):
    """Prometheus output for runs without the daemon: a node_exporter textfile, a Pushgateway."""

    textfile: str | None = None
    pushgateway_url: Secret | None = None
    pushgateway_job: str = "pgvault"


class CheckSettings(Section):
    """WARNING thresholds of `pgvault check` (CRITICAL comes from [objectives])."""

    warn_age_hours: Annotated[float, Meta(ge=0)] = 0.0  # 0: no age warning below the RPO
    warn_drill_age_days: Annotated[float, Meta(ge=0)] = 8.0  # 0: never warn about drills
    # Physical clusters: WARNING when the newest archived WAL segment is older than this
    # (set it above archive_timeout); 0: only the RPO judges the archive.
    warn_archive_minutes: Annotated[float, Meta(ge=0)] = 0.0


class PhysicalSettings(Section):
    """Base backups, WAL archiving and point-in-time recovery of one PostgreSQL cluster."""

    cluster: Annotated[str, Meta(min_length=1)] = "main"  # its name (folder) in the repository
    # fetch: pg_basebackup -X fetch puts the WAL in base.tar; archive: -X none, the WAL comes
    # from the archive (wal-push); auto: archive when the server archives with wal-push.
    wal_method: Literal["auto", "fetch", "archive"] = "auto"
    fast_checkpoint: bool = False
    recovery_window: str | None = None  # e.g. "7d": restorable to any point in the last 7 days
    archive_wait_seconds: Annotated[float, Meta(gt=0)] = 60.0
    # wal-push also pushes up to this many other ready segments in parallel, and marks
    # them done once stored: one process start-up for several segments. 0: one at a time.
    push_ahead: Annotated[int, Meta(ge=0, le=64)] = 4
    # Files one wal-push call archives at most while the server keeps marking segments
    # ready (each finished push makes room for the next): 0 means 8 x (1 + push_ahead).
    push_budget: Annotated[int, Meta(ge=0, le=10000)] = 0
    # A WAL repository ([[repos]] wal = true) that failed a push is left alone for this
    # long (its segments go to its backlog), so an outage costs one io_timeout per
    # retry, not one per segment.
    wal_retry_seconds: Annotated[float, Meta(ge=0)] = 30.0


class RepoEntry(Section):
    """One `[[repos]]` entry: a repository by name, with its own retention and [s3] keys.

    One entry is the primary (backups go there); the others are copies `pgvault copy`
    brings up to date. ``retention`` and ``s3`` hold only the keys this repository
    overrides; ``copy_lag_hours`` is the copy's objective (default: one backup interval).
    """

    name: Annotated[str, Meta(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    url: Annotated[str, Meta(min_length=1)]
    primary: bool = False
    # Refuse to receive anything not age-encrypted, whether a backup or a copy writes it.
    require_encrypted: bool = False
    # `pgvault daemon` copies here after each backup, and/or on this schedule of its own.
    copy_after_backup: bool = False
    copy_schedule: str | None = None
    # This repository's own S3 keys instead of the AWS_* chain: <P>_AWS_ACCESS_KEY_ID,
    # <P>_AWS_SECRET_ACCESS_KEY, <P>_AWS_SESSION_TOKEN (each or its _FILE) for P = this.
    credentials_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    retention: dict[str, Any] = field(default_factory=dict)
    s3: dict[str, Any] = field(default_factory=dict)
    copy_lag_hours: Annotated[float, Meta(gt=0)] | None = None
    # wal-push archives each segment to every WAL repository (default: the primary only).
    wal: bool | None = None

    @property
    def wal_enabled(self) -> bool:
        return self.primary if self.wal is None else self.wal

    def __post_init__(self) -> None:
        for key, section in (("retention", RetentionSettings), ("s3", S3Settings)):
            try:
                msgspec.convert(getattr(self, key), section, strict=False, dec_hook=_dec_hook)
            except msgspec.ValidationError as exc:
                raise ValueError(f"[{key}] {exc}") from None


class FleetSettings(Section):
    """`pgvault run --shard I/N`: each database backed up once per window, under leases.

    Windows are aligned on the epoch (window_hours = 24: one per UTC day). A database's
    start is spread by up to jitter_minutes into its window; a failure waits
    backoff_seconds, doubled each time up to backoff_max_seconds. A lease not renewed for
    lease_seconds is taken over.
    """

    window_hours: Annotated[float, Meta(gt=0)] = 24.0
    jitter_minutes: Annotated[float, Meta(ge=0)] = 0.0
    max_per_repository: Annotated[int, Meta(ge=1, le=1000)] = 4
    max_per_server: Annotated[int, Meta(ge=1, le=100)] = 1
    lease_seconds: Annotated[float, Meta(ge=1)] = 120.0
    backoff_seconds: Annotated[float, Meta(ge=0)] = 60.0
    backoff_max_seconds: Annotated[float, Meta(ge=0)] = 3600.0

    def __post_init__(self) -> None:
        if self.jitter_minutes >= self.window_hours * 60:
            raise ValueError("[fleet] jitter_minutes must be shorter than the window")


class SnapshotCopyTarget(Section):
    """One `[[databases.snapshot.copies]]`: a copy of each snapshot in another region."""

    region: Annotated[str, Meta(min_length=1)]
    # The destination region's KMS key (an encrypted snapshot's copy needs one there).
    kms_key_id: str | None = None
    # This region's own GFS retention over its pgvault-tagged copies; unset keys: [retention].
    retention: dict[str, int | str] | None = None


class SnapshotSettings(Section):
    """Provider snapshots of a managed database (`pgvault snapshot`): RDS, Aurora or Neon.

    Credentials come from the AWS_* chain, as for S3, and Neon's API key from NEON_API_KEY
    (or NEON_API_KEY_FILE); never from this file.
    """

    provider: Literal["rds", "aurora", "neon"]
    instance: str | None = None  # rds: the DB instance identifier
    cluster: str | None = None  # aurora: the DB cluster identifier
    project: str | None = None  # neon: the project id
    branch: str | None = None  # neon: the branch id (snapshots need a root branch)
    api_url: str = "https://console.neon.tech/api/v2"  # neon
    # neon: "branch" takes a branch at the moment instead, where snapshots are unavailable.
    mode: Literal["snapshot", "branch"] = "snapshot"
    # neon: the snapshot's expires_at, a safety net behind retention (None: no expiry).
    expire_days: Annotated[float, Meta(gt=0)] | None = None
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / the AWS profile's
    endpoint_url: str | None = None  # another RDS API endpoint (a test server, a VPC endpoint)
    # AWS allows 100 manual snapshots per region (instance and cluster snapshots each):
    # pgvault refuses to create one at this count and warns from 80% of it.
    quota: Annotated[int, Meta(ge=1, le=100000)] = 100
    wait_timeout_seconds: Annotated[float, Meta(gt=0)] = 3600.0
    poll_seconds: Annotated[float, Meta(gt=0)] = 15.0
    # The automated backups' retention that check/status expect; None: [retention]
    # keep_daily (at most 35, RDS's maximum).
    automated_retention_days: Annotated[int, Meta(ge=0, le=35)] | None = None
    copies: list[SnapshotCopyTarget] = field(default_factory=list)
    # Read the source's facts (exact row counts, schema) before each snapshot, for drills
    # to compare; needs the database's URL, and counts every row as a logical backup does.
    facts: bool = True
    # AWS runs at most 5 snapshot copies into one destination region at a time (default).
    max_concurrent_copies: Annotated[int, Meta(ge=1, le=100)] = 5
    # Drills (`pgvault verify SNAPSHOT-ID`): a temporary instance restored from the snapshot.
    # None: db.t3.micro (rds), db.t4g.medium (aurora, the smallest class it accepts).
    drill_instance_class: str | None = None
    drill_subnet_group: str | None = None
    drill_security_groups: list[str] = field(default_factory=list)
    # A drill instance older than this is removed by the next snapshot/verify run, even
    # when its owner cannot be proved dead (another host).
    drill_max_hours: Annotated[float, Meta(gt=0)] = 6.0
    # TEST-ONLY seam: connect the drill's checks to this URL instead of the restored
    # instance's endpoint (moto's endpoints are fake). Never set it in production.
    drill_connect_override: str | None = None

    def __post_init__(self) -> None:
        regions = [target.region for target in self.copies]
        if len(set(regions)) != len(regions):
            raise ValueError("[snapshot] copies name one region twice")
        if self.provider == "neon":
            if not (self.project and self.branch):
                raise ValueError("[snapshot] provider 'neon' needs project and branch (its "
                                 "project id and branch id)")
            if self.copies:
                raise ValueError("[snapshot] provider 'neon' has no cross-region copies")
            return
        needed = "instance" if self.provider == "rds" else "cluster"
        if not getattr(self, needed):
            raise ValueError(f"[snapshot] provider {self.provider!r} needs {needed} (its "
                             f"DB {needed} identifier)")

    @property
    def source_id(self) -> str:
        return {"rds": self.instance, "aurora": self.cluster,
                "neon": self.branch}[self.provider] or ""


class SupabaseSettings(Section, kw_only=True):
    """A Supabase project whose own backups `check` and `status` report (its management
    API lists them; it cannot make or hand them out). The access token comes from
    SUPABASE_ACCESS_TOKEN (or SUPABASE_ACCESS_TOKEN_FILE), never from this file."""

    project: Annotated[str, Meta(min_length=1, pattern=r"^[a-z0-9-]+$")]  # the project ref
    api_url: str = "https://api.supabase.com"
    timeout_seconds: Annotated[float, Meta(gt=0, le=120)] = 10.0


_ENTRY_SECTIONS = ("compression", "retention", "objectives", "schedule", "notify")


class DatabaseEntry(Section, dict=True):
    """One `[[databases]]` entry: a database and the settings it overrides."""

    name: Annotated[str, Meta(min_length=1)]
    url: Secret | None = None
    url_env: str | None = None
    backup_globals: bool | None = None
    prune_after_backup: bool | None = None
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    objectives: ObjectivesSettings = field(default_factory=ObjectivesSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    snapshot: SnapshotSettings | None = None
    supabase: SupabaseSettings | None = None

    def given(self, section: str) -> frozenset[str]:
        """The keys of ``section`` this entry sets (overriding the top-level settings).

        load() records them from the file and environment; for an entry built in code,
        the keys whose value is not the default.
        """
        recorded = self.__dict__.get("_given")
        if recorded is not None:
            return recorded.get(section, frozenset())  # type: ignore[no-any-return]
        value = getattr(self, section)
        default = type(value)()
        return frozenset(name for name in value.__struct_fields__
                         if getattr(value, name) != getattr(default, name))


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True,
               dict=True):
    """Every setting pgvault knows; unknown keys are an error that names the key.

    Beside the settings, ``load`` attaches what it read from the environment (``environ``,
    ``secrets``, ``config_file``): properties, not fields, so no file or variable can set
    them and no JSON, repr or asdict of the settings shows them.
    """

    repo: str = field(default_factory=default_repo)
    database: str | None = None
    backup_globals: bool = True
    # pg_dump streams at once, the largest tables' data apart (0: one per CPU, up to 4).
    backup_streams: Annotated[int, Meta(ge=0, le=16)] = 1
    lock_stale_after_hours: Annotated[float, Meta(gt=0)] = 12.0
    # Longest any network wait on the repository may go without progress (connect, send,
    # receive); a stall fails after 3 such waits, well within any sane RPO.
    io_timeout_seconds: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    prune_after_backup: bool = False
    verify_after_backup: bool = False
    s3: S3Settings = field(default_factory=S3Settings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    objectives: ObjectivesSettings = field(default_factory=ObjectivesSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
    physical: PhysicalSettings = field(default_factory=PhysicalSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    databases: list[DatabaseEntry] = field(default_factory=list)
    snapshot: SnapshotSettings | None = None
    supabase: SupabaseSettings | None = None
    repos: list[RepoEntry] = field(default_factory=list)  # 3-2-1: see repository()

    def __post_init__(self) -> None:
        # "[key] message": _describe names the key (msgspec names only the section).
        names = [entry.name for entry in self.databases]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"[databases] database {name!r} is listed twice")
        from pgvault.storage import parse_repo

        repo_names = [entry.name for entry in self.repos]
        for name in repo_names:
            if repo_names.count(name) > 1:
                raise ValueError(f"[repos] repository {name!r} is listed twice")
        if self.repos and sum(entry.primary for entry in self.repos) != 1:
            raise ValueError("[repos] exactly one repository must have primary = true")
        for entry in self.repos:
            try:
                parse_repo(entry.url)
            except ConfigError as exc:
                raise ValueError(f"[repos] {entry.name}: {exc}") from None
        try:
            parse_repo(self.repo)  # a typo must not become a folder in the current directory
        except ConfigError as exc:
            raise ValueError(f"[repo] {exc} (from --repo, PGVAULT_REPO or the config "
                             "file's repo)") from None

    @property
    def environ(self) -> Mapping[str, str]:
        """A read-only snapshot of the environment load() read (what child processes get)."""
        found = self.__dict__.get("_environ")
        return found if found is not None else types.MappingProxyType(os.environ)

    @property
    def secrets(self) -> Secrets:
        """The secrets of the environment, read once by load()."""
        found = self.__dict__.get("_secrets")
        if found is None:
            found = self.__dict__["_secrets"] = _read_secrets(self, self.environ)
        return found

    @property
    def location(self) -> RepoLocation:
        """The repository URL taken apart: the one judgement of its scheme (kind)."""
        from pgvault.storage import parse_repo

        return parse_repo(self.repo)

    @property
    def repository_name(self) -> str | None:
        """The `[[repos]]` entry ``repo`` is (by name or URL; the primary by default)."""
        return self.__dict__.get("_repository")

    def repository(self, name: str) -> Settings:
        """These settings for the `[[repos]]` entry ``name``: its URL, the top-level
        [retention] and [s3] with the keys it overrides. ConfigError for an unknown name."""
        entry = next((e for e in self.repos if e.name == name), None)
        if entry is None:
            known = ", ".join(e.name for e in self.repos) or "none configured"
            raise ConfigError(f"no repository named {name!r} in [[repos]] ({known})")
        retention, s3 = self.__dict__.get("_repo_base") or (self.retention, self.s3)
        chosen = msgspec.structs.replace(
            self, repo=entry.url,
            retention=msgspec.convert(msgspec.structs.asdict(retention) | entry.retention,
                                      RetentionSettings, strict=False),
            s3=msgspec.convert(_deep_update(msgspec.to_builtins(s3), entry.s3), S3Settings,
                               strict=False, dec_hook=_dec_hook))
        _attach(chosen, self)
        chosen.__dict__["_repository"] = entry.name
        chosen.__dict__["_credentials_env"] = entry.credentials_env
        chosen.__dict__["_repo_base"] = (retention, s3)
        return chosen

    def repository_credentials(self) -> tuple[str, str, str | None] | None:
        """The `[[repos]]` entry's own S3 keys (credentials_env), or None: the AWS chain."""
        prefix = self.__dict__.get("_credentials_env")
        if not prefix:
            return None
        key_id = self.secrets.get(f"{prefix}_AWS_ACCESS_KEY_ID")
        secret = self.secrets.get(f"{prefix}_AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise ConfigError(f"[[repos]] {self.repository_name}: credentials_env = "
                              f"{prefix!r} needs {prefix}_AWS_ACCESS_KEY_ID and "
                              f"{prefix}_AWS_SECRET_ACCESS_KEY (or their _FILE)")
        return key_id, secret, self.secrets.get(f"{prefix}_AWS_SESSION_TOKEN")

    @property
    def wal_repositories(self) -> list[str]:
        """The `[[repos]]` wal-push archives to and wal-fetch reads from: this one first,
        then every other WAL repository; none when ``repo`` is no WAL entry of [[repos]]."""
        this = self.repository_name
        entries = [e.name for e in self.repos if e.wal_enabled]
        if this is None or this not in entries:
            return []
        return [this] + [name for name in entries if name != this]

    @property
    def config_file(self) -> str | None:
        """The config file load() read, as given (--config or PGVAULT_CONFIG), or None."""
        return self.__dict__.get("_config_file")


def _attach(settings: Settings, like: Settings) -> Settings:
    """``settings`` (a replace() of ``like``) with what load() attached to ``like``."""
    settings.__dict__.update({key: value for key, value in like.__dict__.items()
                              if key in ("_environ", "_secrets", "_config_file")})
    return settings


class Secrets:
    """Secrets of the environment, each read once: the value, or the error reading it gave.

    An error (an unreadable PGPASSWORD_FILE, say) is raised where the secret is used, as
    when it was read there: a command that never needs it must not fail on it.
    """

    __slots__ = ("_found", "_recipients", "scrub_urls", "scrub_values")

    def __init__(self, found: Mapping[str, str | ConfigError],
                 recipients: tuple[str, ...] | ConfigError,
                 scrub_values: tuple[str, ...], scrub_urls: tuple[str, ...]) -> None:
        self._found = dict(found)
        self._recipients = recipients
        self.scrub_values = scrub_values
        """Values the redactor must mask (passwords, keys, tokens, whole secret values)."""
        self.scrub_urls = scrub_urls
        """URLs that are secret whole (webhooks): ``redact.register_url`` each."""

    def get(self, name: str) -> str | None:
        """Variable ``name``, or the content of the file ``name``_FILE names (None: unset)."""
        value = self._found.get(name)
        if isinstance(value, ConfigError):
            raise ConfigError(str(value))
        return value

    @property
    def pgpassword(self) -> str | None:
        return self.get("PGPASSWORD")

    @property
    def age_passphrase(self) -> str | None:
        """PGVAULT_AGE_PASSPHRASE or its _FILE only (never a flag or the config file)."""
        return self.get("PGVAULT_AGE_PASSPHRASE")

    @property
    def age_recipients(self) -> tuple[str, ...]:
        """encryption.recipients (or PGVAULT_AGE_RECIPIENTS) and recipients_file's lines,
        as written: ``pipeline.age.canonical_recipient`` checks and canonicalizes each."""
        if isinstance(self._recipients, ConfigError):
            raise ConfigError(str(self._recipients))
        return self._recipients

    @property
    def sse_c_key(self) -> bytes:
        """The SSE-C key: PGVAULT_S3_SSE_C_KEY or its _FILE, base64 of 32 random bytes."""
        import base64
        import binascii

        text = self.get("PGVAULT_S3_SSE_C_KEY")
        if not text:
            raise ConfigError("s3.sse = sse-c needs PGVAULT_S3_SSE_C_KEY (or "
                              "PGVAULT_S3_SSE_C_KEY_FILE): base64 of 32 random bytes, e.g. "
                              "from `openssl rand -base64 32`")
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ConfigError("PGVAULT_S3_SSE_C_KEY is not valid base64") from None

    def aws_credentials(self) -> tuple[str, str, str | None] | None:
        """Credentials that only AWS_*_FILE variables give (botocore reads the variables
        themselves but not their _FILE): (key id, secret key, session token) or None."""
        if self._found.get("_aws_from_files") is None:
            return None
        key_id, secret = self.get("AWS_ACCESS_KEY_ID"), self.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            return None
        return key_id, secret, self.get("AWS_SESSION_TOKEN")

    def __repr__(self) -> str:
        return f"Secrets({sorted(k for k in self._found if not k.startswith('_'))})"


ENV_PREFIX = "PGVAULT_"
ENV_NESTED = "__"


def load(flags: Mapping[str, Any], environ: Mapping[str, str],
         files: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from ``flags`` (non-None values), ``environ`` and the TOML file ``files``
    (None: the file PGVAULT_CONFIG names, if any). Read once; nothing else reads the
    environment, and nothing here writes it or tells the redactor (``register_secrets``)."""
    return _load(flags, environ, files)


def _load(flags: Mapping[str, Any], environ: Mapping[str, str],
          config_file: str | os.PathLike[str] | None) -> Settings:
    snapshot = types.MappingProxyType(dict(environ))
    path = os.fspath(config_file) if config_file else snapshot.get("PGVAULT_CONFIG")
    values: dict[str, Any] = {}
    if path:
        file = Path(_expanduser(path, snapshot))
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        values = _check_toml(file)
        _warn_if_exposed(file, values)
    overrides = {key: value for key, value in flags.items() if value is not None}
    age_env = _age_env(snapshot)
    if age_env:
        overrides["encryption"] = {**age_env, **overrides.get("encryption", {})}
    values = _deep_update(_deep_update(values, _env_values(snapshot)), overrides)
    repo_given = "repo" in values
    if repo_given and isinstance(values.get("repos"), list):
        # --repo NAME: a [[repos]] entry by its name stands for its URL.
        for raw in values["repos"]:
            if isinstance(raw, dict) and raw.get("name") == values["repo"] and raw.get("url"):
                values["repo"] = raw["url"]
    if "repo" not in values:
        values["repo"] = default_repo(snapshot)
    try:
        settings = msgspec.convert(values, Settings, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    for entry, raw in zip(settings.databases, values.get("databases") or (), strict=False):
        if isinstance(raw, dict):
            entry.__dict__["_given"] = {key: frozenset(raw[key]) for key in _ENTRY_SECTIONS
                                        if isinstance(raw.get(key), dict)}
    settings.__dict__["_environ"] = snapshot
    settings.__dict__["_config_file"] = path or None
    settings.__dict__["_secrets"] = _read_secrets(settings, snapshot)
    return _selected_repository(settings, repo_given)


def _selected_repository(settings: Settings, repo_given: bool) -> Settings:
    """With `[[repos]]`: the primary, unless repo (--repo, PGVAULT_REPO, the file's repo)
    names another entry, by its name or its URL; a URL of none stays as given."""
    if not settings.repos:
        return settings
    if not repo_given:
        return settings.repository(next(e.name for e in settings.repos if e.primary))
    entry = next((e for e in settings.repos if e.url == settings.repo), None)
    return settings if entry is None else settings.repository(entry.name)


def _expanduser(path: str, environ: Mapping[str, str]) -> str:
    """os.path.expanduser, with HOME taken from ``environ`` (``~user``: from the password
    database, which is what expanduser reads for it)."""
    if path != "~" and not path.startswith("~/"):
        return os.path.expanduser(path)
    home = environ.get("HOME")
    if home is None:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    return (home.rstrip("/") + path[1:]) or "/"


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """PGVAULT_<KEY> and PGVAULT_<SECTION>__<KEY> (any case) as nested values.

    A value for a section, list or table is JSON (PGVAULT_NOTIFY__EVENTS='["all"]');
    any other stays a string for validation to convert. Variables that name no setting
    (PGVAULT_CONFIG, PGVAULT_AGE_RECIPIENTS, ...) are not settings and are skipped.
    """
    found: dict[str, Any] = {}
    nested: list[tuple[list[str], str, str]] = []
    prefix = ENV_PREFIX.lower()
    for variable, raw in environ.items():
        name = variable.lower()
        if not name.startswith(prefix):
            continue
        path = name[len(prefix) :].split(ENV_NESTED)
        if path[0] not in Settings.__struct_fields__:
            continue
        if len(path) == 1:
            found[path[0]] = _env_value(variable, raw, _annotation(Settings, path))
        else:
            nested.append((path, variable, raw))
    # Section variables refine a whole section given as JSON, as they would a file's table.
    for path, variable, raw in sorted(nested):
        if not isinstance(found.get(path[0], {}), dict):
            continue
        target = found
        for key in path[:-1]:
            current = target.get(key)
            target = target.setdefault(key, {}) if current is None else current
            if not isinstance(target, dict):
                break
        else:
            target[path[-1]] = _env_value(variable, raw, _annotation(Settings, path))
    return found


@functools.cache
def _hints(model: type[msgspec.Struct]) -> dict[str, Any]:
    return typing.get_type_hints(model)


def _annotation(model: type[msgspec.Struct], path: list[str]) -> Any:
    """The type of the setting at ``path`` (None for a key no section has)."""
    annotation: Any = model
    for key in path:
        section = _section_type(annotation)
        if section is None or key not in section.__struct_fields__:
            return None
        annotation = _hints(section)[key]
    return annotation


def _section_type(annotation: Any) -> type[msgspec.Struct] | None:
    """The model class of a section, also when it is optional."""
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def _is_structured(annotation: Any) -> bool:
    """Sections, lists and tables come from the environment as JSON."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_structured(arg) for arg in typing.get_args(annotation))
    kind = typing.get_origin(annotation) or annotation
    return isinstance(kind, type) and not issubclass(kind, str | bytes) and issubclass(
        kind, msgspec.Struct | Mapping | Sequence | set | frozenset)


# The words pydantic's lax mode took for booleans (msgspec knows only true/false/1/0).
_BOOLEANS = {"true": True, "1": True, "yes": True, "y": True, "on": True, "t": True,
             "false": False, "0": False, "no": False, "n": False, "off": False, "f": False}


def _env_value(variable: str, raw: str, annotation: Any) -> Any:
    if not _is_structured(annotation):
        if annotation in (bool, bool | None) and raw.strip().lower() in _BOOLEANS:
            return _BOOLEANS[raw.strip().lower()]
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        raise ConfigError(f"{variable} must be JSON (it sets a section or a list)") from None


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it; tables merge key by key, other values replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def _age_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """PGVAULT_AGE_RECIPIENTS (comma-separated) and PGVAULT_AGE_IDENTITY_FILE."""
    found: dict[str, Any] = {}
    recipients = environ.get("PGVAULT_AGE_RECIPIENTS")
    if recipients:
        found["recipients"] = [r.strip() for r in recipients.split(",") if r.strip()]
    identity_file = environ.get("PGVAULT_AGE_IDENTITY_FILE")
    if identity_file:
        found["identity_file"] = identity_file
    return found


def _check_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


# Keys whose value is a secret wherever they appear in the config file.
_SECRET_KEYS = {"password", "url", "server", "webhook_url", "slack_webhook_url",
                "discord_webhook_url", "ping_url", "pushgateway_url"}


def _secret_keys(data: Any, path: str = "") -> list[str]:
    """Dotted names of the values in a parsed TOML file that are secrets."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{path}.{key}" if path else str(key)
            # A [[repos]] url is no secret: a repository URL cannot hold credentials.
            secret_key = key in _SECRET_KEYS and not (key == "url" and path.startswith("repos["))
            if isinstance(value, str) and value and (
                    secret_key or _url_password(value) is not None):
                found.append(name)
            else:
                found += _secret_keys(value, name)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _secret_keys(value, f"{path}[{index}]")
    return found


def _url_password(value: str) -> str | None:
    from urllib.parse import urlsplit

    if "://" not in value:
        return None
    try:
        return urlsplit(value).password
    except ValueError:
        return None


def _warn_if_exposed(path: Path, data: dict[str, Any]) -> None:
    """A config file holding secrets must be private: warn when group or others may read it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    secrets = _secret_keys(data)
    if mode & 0o077 and secrets:
        log.warning("config file %s holds secrets (%s) and is readable by group or others "
                    "(mode %04o); run: chmod 600 %s", path, ", ".join(secrets), mode, path)


def _describe(exc: msgspec.ValidationError) -> str:
    """The problem on one line, naming the key as the user wrote it (never its value).

    msgspec reports the first problem as "<message> - at `$.section[0].key`".
    """
    message, at, where = str(exc).rpartition(" - at `")
    if not at:
        message, where = str(exc), "$`"
    path = re.findall(r"\.(\w+)|\[(\d+)\]", where[:-1])
    keys = [name or index for name, index in path]
    named = re.match(r"\[(\w+)\] (.*)", message, re.DOTALL)
    if named:  # a check of one key (see Settings.__post_init__)
        keys.append(named[1])
        message = named[2]
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", message, re.DOTALL)
    if unknown:
        return f"invalid configuration: unknown setting {'.'.join([*keys, unknown[1]])!r}"
    missing = re.fullmatch(r"Object missing required field `(.*)`", message, re.DOTALL)
    if missing:
        keys.append(missing[1])
        message = "Field required"
    if message.startswith("Invalid enum value"):  # it quotes the value: name the choices
        choices = [c for c in typing.get_args(_annotation(
            Settings, [key for key in keys if not key.isdigit()])) if isinstance(c, str)]
        message = ("Input should be " + ", ".join(repr(c) for c in choices[:-1]) + " or "
                   + repr(choices[-1])) if choices else "Input should be an allowed value"
    return f"invalid configuration: setting {'.'.join(keys)!r}: {message}"


# Read from VAR or from the file VAR_FILE names, once, at load (see Secrets).
_FILE_SECRETS = (*SECRET_VARIABLES, "PGVAULT_AGE_PASSPHRASE", "PGVAULT_S3_SSE_C_KEY",
                 "PGVAULT_CONSOLE_TOKEN", "NEON_API_KEY", "SUPABASE_ACCESS_TOKEN")


def _read_secret(environ: Mapping[str, str], name: str) -> str | ConfigError | None:
    value = environ.get(name)
    if value:
        return value
    file_name = environ.get(name + "_FILE")
    if not file_name:
        return None
    try:
        return Path(file_name).read_text().strip()
    except OSError as exc:
        return ConfigError(f"cannot read {name}_FILE ({file_name}): {exc.strerror}")


def _read_secrets(settings: Settings, environ: Mapping[str, str]) -> Secrets:
    """Every secret the environment (and recipients_file) holds for these settings."""
    names = [*_FILE_SECRETS, *(entry.url_env for entry in settings.databases
                               if entry.url_env and entry.url_env not in _FILE_SECRETS)]
    names += [f"{entry.credentials_env}_{name}" for entry in settings.repos
              if entry.credentials_env
              for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    found: dict[str, str | ConfigError] = {}
    for name in names:
        value = _read_secret(environ, name)
        if value is not None:
            found[name] = value
    if any(not environ.get(name) and isinstance(found.get(name), str)
           for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")):
        found["_aws_from_files"] = "yes"
    plain: list[str] = []
    for name, value in found.items():
        if not isinstance(value, str) or name.startswith("_"):
            continue
        if name == "AWS_ACCESS_KEY_ID" and environ.get(name):
            continue  # an identifier (AWS prints it in errors), unless a _FILE held it
        if name == "PGVAULT_AGE_PASSPHRASE":
            plain.append(value)  # whole, even when it looks like a URL
        plain += _secret_parts(value)
    plain += [environ.get("AWS_SECURITY_TOKEN") or ""]
    if environ.get("PGVAULT_DATABASE"):
        plain.append(_spec_password(environ["PGVAULT_DATABASE"]) or "")
    sse_c = found.get("PGVAULT_S3_SSE_C_KEY")
    if settings.s3.sse == "sse-c" and isinstance(sse_c, str):
        import base64
        import binascii

        # boto3 sends the key base64-encoded in a header: that form is a secret too.
        with contextlib.suppress(binascii.Error):
            plain.append(base64.b64encode(base64.b64decode(sse_c, validate=True)).decode())
    urls: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, Secret):
            text = value.get_secret_value()
            # A connection's secret is its password; its database name is shown (console,
            # status). A webhook's or a ping's URL is secret whole, tokens in its path.
            if not _is_connection(text):
                urls.append(text)
            plain.append(_spec_password(text) or "")
        elif isinstance(value, msgspec.Struct):
            for name in value.__struct_fields__:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            plain.append(_spec_password(value) or "")

    walk(settings)
    return Secrets(found, _recipients(settings.encryption, environ),
                   tuple(dict.fromkeys(v for v in plain if v)),
                   tuple(dict.fromkeys(u for u in urls if u)))


def _is_connection(text: str) -> bool:
    """A PostgreSQL URL or key=value conninfo (as opposed to an HTTP URL)."""
    return text.startswith(("postgres://", "postgresql://")) or (
        "=" in text and "://" not in text)


def _secret_parts(value: str) -> list[str]:
    """What of a secret variable to mask: a URL's password (the rest of a URL is not
    secret), a key=value conninfo's password and the whole string, or the whole value."""
    if "://" in value:
        return [_url_password(value) or ""]
    return [value, _spec_password(value) or ""]


_CONNINFO_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def _spec_password(spec: str) -> str | None:
    """The password inside a connection URL or key=value string, if any."""
    if "://" in spec:
        return _url_password(spec)
    found = _CONNINFO_PASSWORD.search(spec)
    if not found:
        return None
    value = found[1]
    if value.startswith("'"):
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _recipients(encryption: EncryptionSettings,
                environ: Mapping[str, str]) -> tuple[str, ...] | ConfigError:
    """The recipients as written, recipients_file's lines (age's -R format) after them."""
    found = list(encryption.recipients)
    if encryption.recipients_file:
        path = Path(_expanduser(encryption.recipients_file, environ))
        try:
            text = path.read_text()
        except OSError as exc:
            return ConfigError(f"cannot read encryption.recipients_file {path}: "
                               f"{exc.strerror}")
        lines = (line.strip() for line in text.splitlines())
        found += [line for line in lines if line and not line.startswith("#")]
    return tuple(found)


def register_secrets(settings: Settings) -> None:
    """Tell the redactor every secret the settings hold (the old load() did this itself;
    callers of the new one do it at their entry point)."""
    redact.register(*settings.secrets.scrub_values)
    for url in settings.secrets.scrub_urls:
        redact.register_url(url)


# Where a database password may come from: never the command line.
PASSWORD_SOURCES = ("PGPASSWORD or PGPASSWORD_FILE, ~/.pgpass or PGPASSFILE, or a URL in "
                    "DATABASE_URL(_FILE), DIRECT_URL(_FILE), PGVAULT_DATABASE or the config "
                    "file's database")
DATABASE_SOURCES = ("--dbname, PGVAULT_DATABASE, DATABASE_URL (or DIRECT_URL), the config "
                    "file's database or [[databases]], or libpq's PGDATABASE")


def command_line_connection(spec: str, flag: str = "--dbname") -> ConnInfo:
    """A connection given as ``flag``, refused when it holds a password.

    Every user of the host can read a process's argv (ps, /proc/PID/cmdline), so a password
    there is already exposed; refusing teaches where it belongs before it becomes a habit.
    The refusal's ``secrets`` attribute holds the password, for the caller's redactor.
    """
    try:
        conn = ConnInfo.parse(spec)
    except ConfigError as exc:  # a flag's value: a usage error, named by its flag
        raise UsageError(f"{flag}: {exc}") from None
    if conn.password or conn.params.get("sslpassword"):
        refusal = UsageError(f"{flag} holds a password, and every user of this host can read "
                             f"the command line (ps): remove it and give the password through "
                             f"{PASSWORD_SOURCES}")
        refusal.secrets = tuple(  # type: ignore[attr-defined]
            v for v in (conn.password, conn.params.get("sslpassword")) if v)
        raise refusal
    return conn


def _connection_spec(settings: Settings, dbname: str | None) -> tuple[str | None, str]:
    """The connection string that wins, and where it came from (for error messages)."""
    if dbname:
        return dbname, "--dbname"
    if settings.environ.get("PGVAULT_DATABASE"):
        return settings.environ["PGVAULT_DATABASE"], "PGVAULT_DATABASE"
    for name in ("DIRECT_URL", "DATABASE_URL"):  # a broken _FILE fails only when needed
        spec = settings.secrets.get(name)
        if spec:
            return spec, name
    return settings.database or None, "the config file's database"


def connection(settings: Settings, dbname: str | None = None) -> ConnInfo:
    """The database to back up: --dbname > PGVAULT_DATABASE > DIRECT_URL > DATABASE_URL > file.

    With none of them, libpq's PG* variables and defaults decide, as for psql. ``dbname``
    comes from the command line: a password in it is refused.
    """
    if dbname:
        command_line_connection(dbname)
    spec, source = _connection_spec(settings, dbname)
    try:
        conn = ConnInfo.parse(spec, password=settings.secrets.pgpassword,
                              environ=settings.environ)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return conn


@dataclass(frozen=True)
class Target:
    """One database the jobs and the daemon work on, with its effective settings."""

    name: str | None
    """The database name in the repository; None: whatever the connection names."""
    settings: Settings
    """Top-level settings with this database's ``[[databases]]`` overrides applied."""
    entry: DatabaseEntry | None = None


def targets(settings: Settings) -> list[Target]:
    """Every configured database; without ``[[databases]]``, the one the connection names."""
    if not settings.databases:
        return [Target(None, settings)]
    return [Target(entry.name, _merged(settings, entry), entry) for entry in settings.databases]


def _merged(settings: Settings, entry: DatabaseEntry) -> Settings:
    """``settings`` with the keys ``entry`` sets (and only those) replaced."""
    update: dict[str, Any] = {"databases": []}
    for key in ("backup_globals", "prune_after_backup", "snapshot", "supabase"):
        if getattr(entry, key) is not None:
            update[key] = getattr(entry, key)
    for key in _ENTRY_SECTIONS:
        section = getattr(entry, key)
        given = entry.given(key)
        if given:
            base = getattr(settings, key)
            update[key] = msgspec.structs.replace(
                base, **{name: getattr(section, name) for name in given})
    return _attach(msgspec.structs.replace(settings, **update), settings)


def target_connection(target: Target, dbname: str | None = None) -> ConnInfo:
    """How to reach ``target``: its url, the variable url_env names, or the default server."""
    entry = target.entry
    if dbname or entry is None:
        # Without a name, libpq's default is the OS user's database: a backup of whatever
        # that is, filed under it, is no backup of what the user meant.
        environ = target.settings.environ
        if not (_connection_spec(target.settings, dbname)[0] or environ.get("PGDATABASE")
                or environ.get("PGSERVICE")):
            raise ConfigError(f"no database given: name one with {DATABASE_SOURCES}")
        return connection(target.settings, dbname)
    secrets = target.settings.secrets
    password = secrets.pgpassword
    environ = target.settings.environ
    if entry.url is not None:
        conn = ConnInfo.parse(entry.url.get_secret_value(), password=password, environ=environ)
    elif entry.url_env:
        spec = secrets.get(entry.url_env)
        if not spec:
            raise ConfigError(f"database {entry.name!r}: environment variable {entry.url_env} "
                              "(or its _FILE) is not set")
        conn = ConnInfo.parse(spec, password=password, environ=environ)
    else:
        return connection(target.settings).with_dbname(entry.name)
    if conn.dbname and conn.dbname != entry.name:
        raise ConfigError(f"database {entry.name!r}: its connection names database "
                          f"{conn.dbname!r}; name the entry after the database")
    return conn.with_dbname(entry.name)

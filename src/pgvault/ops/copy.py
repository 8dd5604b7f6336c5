"""Copies of backups between repositories (3-2-1): objects first, manifest last.

A copy moves each artifact's stored bytes as they are (no decoding, no re-encryption, so
no secret key is needed), checks every byte read against the size and sha256 the manifest
records before the target's put completes (``VerifyingReader``: a mismatch aborts the put,
nothing is left), and commits the source's manifest bytes at the target last. A copy killed
at any moment therefore leaves at most complete, verified objects under a backup id that
has no manifest: invisible to list, restore and prune's plan (prune collects them as
orphans once they are old), and the next copy finishes the backup without sending them
again: an object already at the target is kept when its size and a read-back sha256 match.

What a copy brings is what the target's own retention policy keeps: a backup the target
would prune is not copied (it would be sent again after each prune), unless named by id.
The lag of a copy (``lag``) counts the same set: backups the target should hold and lacks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pgvault import logs, retention
from pgvault.catalog import (
    PASSPHRASE_IDENTITY,
    Catalog,
    artifact_key,
    lock_key,
    manifest_key,
    wal_identity_key,
    wal_prefix,
)
from pgvault.errors import (
    AlreadyExists,
    ConfigError,
    IntegrityError,
    NotFound,
    PgvaultError,
    StorageError,
)
from pgvault.health import CopyState
from pgvault.lock import hold
from pgvault.model import Artifact, Manifest, from_json
from pgvault.ops.prune import candidate
from pgvault.pipeline.digest import HashingReader, VerifyingReader
from pgvault.retention import Candidate, Policy
from pgvault.storage.base import ObjectInfo, Storage

log = logs.get("copy")

Progress = Callable[[str], None]
"""Told one line per backup copied (the CLI prints it)."""


@dataclass
class CopyReport:
    """What one copy run did at one target."""

    target: str
    copied: list[str] = field(default_factory=list)
    """Backups committed at the target by this run (database/id)."""
    in_sync: int = 0
    """Backups that were already complete at the target."""
    not_kept: int = 0
    """Backups of the source the target's retention policy does not keep (not copied)."""
    failed: dict[str, str] = field(default_factory=dict)
    """Backups that could not be copied (database/id -> why); the others still were."""
    objects_sent: int = 0
    objects_kept: int = 0
    """Objects already at the target with the right size and sha256 (not sent again)."""
    bytes_sent: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.bytes_sent / self.seconds / 1e6 if self.seconds else 0.0
        line = (f"{self.target}: {len(self.copied)} backup(s) copied, {self.in_sync} already "
                f"there, {self.not_kept} not kept by its retention; {self.objects_sent} "
                f"object(s) sent ({self.bytes_sent / 1e6:.1f} MB, {rate:.1f} MB/s), "
                f"{self.objects_kept} already there and verified")
        if self.failed:
            line += f"; {len(self.failed)} failed"
        return line


@dataclass(frozen=True)
class Lag:
    """How far a copy is behind: backups its policy keeps that it lacks, the newest's age."""

    target: str
    behind: int
    newest_missing: datetime | None
    objective: timedelta
    newest: datetime | None = None
    """When the target's own newest backup (of the database asked about) started."""

    def age(self, now: datetime) -> timedelta | None:
        return None if self.newest_missing is None else now - self.newest_missing

    def late(self, now: datetime) -> bool:
        """Whether the newest backup missing at the target is older than the objective."""
        age = self.age(now)
        return age is not None and age > self.objective


def _same(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests record the same stored objects (pins may differ per repo)."""
    def objects(m: Manifest) -> list[tuple[str, int, str]]:
        return sorted((x.key, x.size, x.sha256) for x in m.artifacts)

    return a.kind == b.kind and objects(a) == objects(b)


def missing(source: Catalog, target: Catalog, policy: Policy, now: datetime,
            database: str | None = None) -> list[Manifest]:
    """The source's backups the target's policy keeps and the target lacks (or holds
    incomplete or different), oldest first."""
    source_listing = source.scan(database)
    bad = source.bad(database)
    there = {(m.database, m.id): m for m in target.scan(database).manifests}
    wanted: list[Manifest] = []
    names = sorted({m.database for m in source_listing.manifests})
    for name in names:
        theirs = [m for m in there.values() if m.database == name]
        ours = [m for m in source_listing.manifests if m.database == name]
        for kind in sorted({m.kind for m in ours}):
            # The plan runs over what the target would hold after the copy: its own
            # backups and every good one of the source it lacks.
            # Candidates carry their parent: a kept incremental keeps (and so copies) the
            # backups it is built on.
            pool: dict[str, Candidate] = {
                m.id: candidate(m, {}) for m in theirs if m.kind == kind}
            for m in ours:
                if m.kind == kind and (m.database, m.id) not in bad and m.id not in pool:
                    pool[m.id] = candidate(m, {})
            if not pool:
                continue
            keep = set(retention.plan(list(pool.values()), policy, now).keep)
            for m in ours:
                current = there.get((m.database, m.id))
                if m.kind == kind and m.id in keep and (current is None
                                                        or not _same(current, m)):
                    wanted.append(m)
    return sorted(wanted, key=lambda m: (m.started_at, m.id))


def lag(source: Catalog, target: Catalog, policy: Policy, now: datetime, *, name: str,
        objective: timedelta, database: str | None = None) -> Lag:
    """How far ``target`` is behind ``source`` (see ``missing``)."""
    behind = missing(source, target, policy, now, database)
    return Lag(name, len(behind), max((m.started_at for m in behind), default=None),
               objective, max((m.started_at for m in target.list(database)), default=None))


def backup_interval(expr: str, timezone: str) -> timedelta:
    """The time between two runs of a schedule ([schedule] backup), 24 h if unknowable:
    a copy's default objective."""
    from pgvault.schedule import every, trigger

    found = every(expr)
    if found is not None:
        return found
    try:
        fire = trigger(expr, timezone)
        start = datetime.now(UTC)
        first = fire.get_next_fire_time(None, start)
        second = fire.get_next_fire_time(first, first + timedelta(seconds=1))
        return timedelta(seconds=(second - first).total_seconds())
    except Exception:
        return timedelta(hours=24)


def record_run(source: Catalog, name: str, now: datetime, *,
               report: CopyReport | None = None, error: str | None = None) -> None:
    """Note a copy run to ``name`` in the source's record of it (status, check and the
    metrics show its last error); a source that cannot be written is logged, not fatal."""
    record = source.copy_record(name) or {}
    if error is None and report is not None and report.failed:
        label, why = next(iter(report.failed.items()))
        error = f"{len(report.failed)} backup(s) failed, {label}: {why}"
    record.update(target=name, last_run=now.isoformat())
    if error is not None:
        record.update(last_error=error, last_error_at=now.isoformat())
    else:
        record.update(last_success=now.isoformat(),
                      copied=len(report.copied) if report is not None else 0)
    try:
        source.write_copy_record(name, record)
    except StorageError as exc:
        log.warning("could not record the copy to %s: %s", name, exc)


def last_error(record: dict[str, Any] | None) -> tuple[str, datetime] | None:
    """The error of the last copy run, if it failed (an older one a success fixed: None)."""
    if not record or not record.get("last_error") or not record.get("last_error_at"):
        return None
    try:
        failed = datetime.fromisoformat(record["last_error_at"])
        succeeded = record.get("last_success")
        if succeeded and datetime.fromisoformat(succeeded) >= failed:
            return None
    except (TypeError, ValueError):
        return None
    return str(record["last_error"]), failed


def copy(source: Storage, target: Storage, *, name: str, policy: Policy, now: datetime,
         ref: str = "all", database: str | None = None, jobs: int = 4,
         lock_stale_after: timedelta = timedelta(hours=12),
         progress: Progress | None = None, require_encrypted: bool = False) -> CopyReport:
    """Bring ``target`` up to date with ``source``: every backup its ``policy`` keeps
    (``ref`` "all"), or one backup by id, unique id prefix or 'latest'.
    ``require_encrypted``: a backup with an artifact not age-encrypted is refused (failed).

    A backup that fails (its source objects gone, damaged, a storage error) is named in
    ``failed`` and the others are still copied; the caller decides the exit code.
    """
    started = time.monotonic()
    src, dst = Catalog(source), Catalog(target)
    report = CopyReport(name)
    if ref == "all":
        chosen = missing(src, dst, policy, now, database)
        there = {(m.database, m.id): m for m in dst.list(database)}
        listed = src.list(database)
        report.in_sync = sum(1 for m in listed if (m.database, m.id) in there
                             and _same(there[(m.database, m.id)], m))
        report.not_kept = len(listed) - report.in_sync - len(chosen)
    else:
        manifest = src.get(ref, database)
        current = _target_manifest(dst, manifest)
        chosen = [] if current is not None and _same(current, manifest) else [manifest]
        report.in_sync = 1 - len(chosen)
    if chosen:
        _copy_passphrase_key(source, target)
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="copy") as pool:
        for name_ in sorted({m.database for m in chosen}):
            with hold(target, lock_key(name_), "copy", stale_after=lock_stale_after,
                      name=name_):
                for manifest in [m for m in chosen if m.database == name_]:
                    label = f"{manifest.database}/{manifest.id}"
                    try:
                        if require_encrypted:
                            _require_encrypted(manifest, name)
                        _copy_backup(source, target, manifest, pool, report)
                    except PgvaultError as exc:
                        report.failed[label] = str(exc)
                        if progress is not None:
                            progress(f"FAILED {label}: {exc}")
                        continue
                    report.copied.append(label)
                    if progress is not None:
                        progress(f"copied {label} ({manifest.size / 1e6:.1f} MB)")
    report.seconds = time.monotonic() - started
    return report


def _require_encrypted(manifest: Manifest, name: str) -> None:
    plain = [a.name for a in manifest.artifacts if not any(s.name == "age" for s in a.stages)]
    if plain:
        raise ConfigError(f"repository {name} requires encrypted backups (require_encrypted "
                          f"= true) and backup {manifest.id} is not ({', '.join(plain)} "
                          "unencrypted): not copied")


def _target_manifest(target: Catalog, manifest: Manifest) -> Manifest | None:
    try:
        return target.read(manifest_key(manifest.database, manifest.id))
    except (NotFound, IntegrityError):
        return None  # a damaged manifest at the target is rewritten by the copy


def _copy_backup(source: Storage, target: Storage, manifest: Manifest,
                 pool: ThreadPoolExecutor, report: CopyReport) -> None:
    # The manifest as stored, byte for byte: the copy's listing is the source's.
    data = source.read_bytes(manifest_key(manifest.database, manifest.id))
    stored = from_json(Manifest, data)
    if not _same(stored, manifest):
        raise IntegrityError(f"backup {manifest.id} changed at the source while copying")
    # One listing instead of a HEAD per object: small objects cost a request each.
    there = {info.key: info.size for info in
             target.list(artifact_key(manifest.database, manifest.id, ""))}
    results = list(pool.map(lambda a: _copy_artifact(source, target, a, there.get(a.key)),
                            manifest.artifacts))
    if manifest.kind == "physical":
        results += _copy_wal(source, target, manifest.database, pool)
    for sent, size in results:
        if sent:
            report.objects_sent += 1
            report.bytes_sent += size
        else:
            report.objects_kept += 1
    target.put_bytes(manifest_key(manifest.database, manifest.id), data)


def _copy_artifact(source: Storage, target: Storage, artifact: Artifact,
                   size_there: int | None) -> tuple[bool, int]:
    """(sent, size): put unless the target already holds exactly these bytes."""
    if size_there == artifact.size and \
            _sha256(target, artifact.key) == artifact.sha256:
        return False, artifact.size
    with contextlib.closing(source.open(artifact.key)) as stream:
        checked = VerifyingReader(stream, size=artifact.size, sha256=artifact.sha256,
                                  what=f"{source.url}/{artifact.key}")
        written = target.put(artifact.key, checked)  # type: ignore[arg-type]
    if not checked.verified or written.size != artifact.size:
        target.delete([artifact.key])
        raise IntegrityError(f"{target.url}/{artifact.key}: {written.size} bytes written, "
                             f"{artifact.size} recorded")
    return True, artifact.size


def _sha256(storage: Storage, key: str) -> str:
    digest = hashlib.sha256()
    with contextlib.closing(storage.open(key)) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_wal(source: Storage, target: Storage, cluster: str,
              pool: ThreadPoolExecutor) -> list[tuple[bool, int]]:
    """The cluster's archived WAL the target lacks, and its identity record.

    A WAL object's key names the sha256 of the raw file and is written once, so an object
    of the same key and size at the target is that object; what is sent is checked as
    read (the bytes hashed on the way equal the bytes the target confirms).
    """
    with contextlib.suppress(NotFound, AlreadyExists):
        target.create(wal_identity_key(cluster), source.read_bytes(wal_identity_key(cluster)))
    there = {info.key: info.size for info in target.list(wal_prefix(cluster))}
    wanted = [info for info in source.list(wal_prefix(cluster))
              if info.key != wal_identity_key(cluster) and there.get(info.key) != info.size
              and info.key.count("/") == 4]

    def send(info: ObjectInfo) -> tuple[bool, int]:
        with contextlib.closing(source.open(info.key)) as stream:
            hashed = HashingReader(stream)
            written = target.put(info.key, hashed)  # type: ignore[arg-type]
        if hashed.size != info.size or written.size != info.size:
            target.delete([info.key])
            raise IntegrityError(f"{target.url}/{info.key}: {written.size} bytes written, "
                                 f"{info.size} listed at the source")
        return True, info.size

    return list(pool.map(send, wanted))


def _copy_passphrase_key(source: Storage, target: Storage) -> None:
    """Passphrase-mode backups need the source's wrapped key at the target to restore."""
    try:
        key = source.read_bytes(PASSPHRASE_IDENTITY)
    except NotFound:
        return
    try:
        target.create(PASSPHRASE_IDENTITY, key)
    except AlreadyExists:
        if target.read_bytes(PASSPHRASE_IDENTITY) != key:
            raise ConfigError(f"{target.url} holds another passphrase key "
                              f"({PASSPHRASE_IDENTITY}) than {source.url}: backups copied "
                              "there could not be restored with it; copy to an empty "
                              "repository") from None



class _Target(Protocol):
    @property
    def catalog(self) -> Catalog: ...
    @property
    def policy(self) -> Policy: ...


def copy_states(source: Catalog, targets: Sequence[tuple[str, Callable[[], _Target], timedelta]],
                database: str, now: datetime, *, timeout: float = 10.0
                ) -> tuple[CopyState, ...]:
    """Each copy's lag and last error: (name, its opener, its objective) per copy. A copy
    that cannot be read (or not within ``timeout`` seconds: the metrics after a backup must
    not wait for a stalled copy's retries) is behind by the source's backups since its
    last successful copy (what the source alone knows)."""
    found: list[CopyState] = []
    for name, opening, objective in targets:
        try:
            record = source.copy_record(name)
        except StorageError:
            record = None
        failed = last_error(record)
        error, at = failed if failed is not None else (None, None)
        try:
            behind = _within(timeout, functools.partial(
                _lag_of, source, opening, now, name, objective, database), what=name)
        except PgvaultError as exc:
            since = unconfirmed(source, record, database)
            found.append(CopyState(name, len(since), max(
                (m.started_at for m in since), default=None), None, objective, error, at,
                str(exc)))
            continue
        found.append(CopyState(name, behind.behind, behind.newest_missing, behind.newest,
                               objective, error, at))
    return tuple(found)


def unconfirmed(source: Catalog, record: dict[str, Any] | None,
                database: str | None) -> list[Manifest]:
    """The source's backups newer than the last successful copy ``record`` names (all of
    them if none): at most what a copy that cannot be read lacks."""
    succeeded = (record or {}).get("last_success")
    try:
        since = datetime.fromisoformat(succeeded) if succeeded else None
    except (TypeError, ValueError):
        since = None
    return [m for m in source.list(database) if since is None or m.finished_at > since]


def _lag_of(source: Catalog, opening: Callable[[], _Target], now: datetime, name: str,
            objective: timedelta, database: str) -> Lag:
    target = opening()
    return lag(source, target.catalog, target.policy, now, name=name, objective=objective,
               database=database)


def _within(seconds: float, read: Callable[[], Lag], *, what: str) -> Lag:
    """``read()``'s result, or StorageError when it takes longer than ``seconds`` (it goes on
    in a daemon thread, which a stalled connection's timeouts end later)."""
    found: list[Lag | BaseException] = []

    def run() -> None:
        try:
            found.append(read())
        except BaseException as exc:  # handed to the caller's thread
            found.append(exc)

    thread = threading.Thread(target=run, name=f"copy-lag-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if not found:
        raise StorageError(f"repository {what} did not answer within {seconds:g} s")
    if isinstance(found[0], BaseException):
        raise found[0]
    return found[0]

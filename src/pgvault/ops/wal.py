"""WAL archiving: push one WAL file durably, fetch it back, check the archive, prune it.

Each archived file is stored under a key named by the sha256 of its raw bytes, so:
- a push appears atomically (storage.put) and a killed push leaves nothing under that key;
- pushing the same bytes again finds its own key and succeeds without writing (idempotent);
- different bytes under a name already archived are refused (two servers writing the same
  timeline: split brain), and a fetch that finds two versions refuses to choose;
- a fetch checks the decoded bytes against the sha256 in the key.
A cluster name is bound to one system identifier (``identity.json``, created by the first
push); segments from any other system are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgvault import pipeline
from pgvault.artifacts import store_artifact
from pgvault.catalog import ArchivedFile, Catalog, wal_object_key
from pgvault.errors import (
    AlreadyExists,
    BackupFailed,
    ConfigError,
    IntegrityError,
    NotFound,
    StorageError,
    UsageError,
)
from pgvault.health import ArchiveStatus, TimelineRange
from pgvault.model import Identity, Manifest, PushFailures, StageSpec
from pgvault.pg import wal
from pgvault.pg.conninfo import ConnInfo
from pgvault.pipeline.stream import CHUNK
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    import psycopg

    from pgvault.pipeline.age import Keyring


WAL_FORMAT = "wal"
"""The format of an archived WAL file: the server's own bytes (no manifest records it)."""


@dataclass(frozen=True)
class PushResult:
    """What one push did: stored the file, or found the very same bytes already there."""

    walfile: str
    key: str
    raw_size: int
    stored_size: int
    already_archived: bool
    seconds: float


def stages_of_suffix(suffix: str) -> list[StageSpec]:
    """The stages a suffix such as '.zst.age' names, first applied first."""
    by_extension = {ext.lstrip("."): name for name, ext in pipeline.SUFFIXES.items()}
    names = [by_extension.get(part, part) for part in suffix.split(".") if part]
    # No manifest records how a WAL file was encrypted, so any configured key may try it.
    return [StageSpec(name=n, passphrase=True if n == "age" else None) for n in names]


def read_identity(storage: Storage, cluster: str) -> Identity | None:
    """The identity a cluster name is bound to; None before its first push."""
    return Catalog(storage).wal_identity(cluster)


_CHECKED: weakref.WeakKeyDictionary[Storage, set[tuple[str, str, int]]] = (
    weakref.WeakKeyDictionary())
"""(cluster, system, segment size) found bound in each open repository: a binding is
created once and never changes, so the segments pushed ahead need not read it again."""


def check_identity(storage: Storage, cluster: str, system_identifier: str,
                   segment_size: int, *, bind: bool) -> Identity:
    """Refuse a foreign system; with ``bind``, the first caller binds the name to its system."""
    seen = (cluster, system_identifier, segment_size)
    try:
        known = _CHECKED.setdefault(storage, set())
    except TypeError:  # a storage that cannot be weakly referenced: no memo
        known = set()
    if seen in known:
        return Identity(system_identifier, segment_size)
    identity = _checked_identity(storage, cluster, system_identifier, segment_size, bind=bind)
    if bind:
        known.add(seen)
    return identity


def _checked_identity(storage: Storage, cluster: str, system_identifier: str,
                      segment_size: int, *, bind: bool) -> Identity:
    identity = read_identity(storage, cluster)
    if identity is None:
        if not bind:
            return Identity(system_identifier, segment_size)
        ours = Identity(system_identifier, segment_size)
        try:
            Catalog(storage).bind_wal_identity(cluster, ours, bound_at=datetime.now(UTC),
                                               host=socket.gethostname())
            return ours
        except AlreadyExists:
            identity = read_identity(storage, cluster)
            assert identity is not None
    if identity.system_identifier != system_identifier:
        raise ConfigError(
            f"REFUSED: this server is database system {system_identifier}, but cluster "
            f"{cluster!r} in {storage.url} holds the WAL of system "
            f"{identity.system_identifier}; give this server its own --cluster name"
        )
    if identity.wal_segment_size != segment_size:
        raise ConfigError(
            f"REFUSED: WAL segment size {segment_size} differs from the "
            f"{identity.wal_segment_size} bytes recorded for cluster {cluster!r}"
        )
    return identity


def versions(storage: Storage, cluster: str, walfile: str) -> list[ArchivedFile]:
    """Every stored version of one WAL file name (more than one only after a split brain)."""
    return Catalog(storage).wal_versions(cluster, walfile)


def archived(storage: Storage, cluster: str) -> list[ArchivedFile]:
    """Every archived WAL object of a cluster, in key order."""
    return Catalog(storage).wal_files(cluster)


def push(storage: Storage, cluster: str, path: Path, stages: list[StageSpec]) -> PushResult:
    """Store one WAL file; returns only once it is durably stored (or already was)."""
    known = _Known(storage, cluster)
    result = _push_one(known, path, stages)
    known.confirm()
    return result


def push_read(storage: Storage, cluster: str, names: list[str],
              read: Callable[[str], bytes | None], stages: list[StageSpec]
              ) -> list[PushResult]:
    """Store each of ``names`` not archived yet, as ``push`` would, its bytes got from
    ``read`` (None: left out), for a caller that reads the files itself (a base backup
    keeps a segment only if it kept its name through the read). One listing per name
    group before the puts and one after them all, as for a push ahead; durable and
    checked against a second writer on return (IntegrityError names a conflict)."""
    known = _Known(storage, cluster)
    results = []
    for walfile in names:
        name = wal.parse_wal_name(walfile)
        if name is None:
            raise UsageError(f"{walfile!r} is not a WAL file name PostgreSQL archives")
        if known.versions(walfile):
            continue
        started = time.monotonic()
        data = read(walfile)
        if data is None:
            continue
        segment = _Segment(name, data, hashlib.sha256(data).hexdigest())
        results.append(_store(known, segment, stages, None, started))
    conflicts = known.confirm()
    if conflicts:
        raise next(iter(conflicts.values()))
    return results


def _push_one(known: _Known, path: Path, stages: list[StageSpec]) -> PushResult:
    started = time.monotonic()
    return _store(known, _read(path), stages, None, started)


def _name_group(walfile: str) -> str:
    """The WAL names one listing answers for: those that differ only in their last two hex
    digits (a segment's 256 neighbours at most, a history file alone), so that a listing
    costs one page however large the archive grows."""
    return walfile[:22]


class _Known:
    """What one repository holds of the WAL names a call pushes, listed once per group of
    names (``_name_group``) instead of twice per file, and what the call stored there.

    Keys are content-addressed, so a listing made earlier in the call is only ever stale in
    one way: a version that arrived since. The same bytes then are the same key (the put
    rewrites it, harmless); other bytes are what ``confirm`` lists again for, once.
    """

    def __init__(self, storage: Storage, cluster: str) -> None:
        import threading

        self.storage, self.cluster = storage, cluster
        self._lock = threading.Lock()
        self._groups: dict[str, dict[str, list[ArchivedFile]]] = {}
        self._stored: list[tuple[str, str]] = []  # (walfile, sha256) this call put

    def _list(self, group: str) -> dict[str, list[ArchivedFile]]:
        found: dict[str, list[ArchivedFile]] = {}
        for version in Catalog(self.storage).wal_versions_named(self.cluster, group):
            found.setdefault(version.wal.name, []).append(version)
        return found

    def versions(self, walfile: str) -> list[ArchivedFile]:
        group = _name_group(walfile)
        # Held while listing: the neighbours pushed in parallel wait for this one listing.
        with self._lock:
            if group not in self._groups:
                self._groups[group] = self._list(group)
            return list(self._groups[group].get(walfile, []))

    def stored(self, walfile: str, digest: str) -> None:
        with self._lock:
            self._stored.append((walfile, digest))

    def confirm(self, only: set[str] | None = None) -> dict[str, IntegrityError]:
        """List again each group this call stored into (after every put of the call ended):
        the stored files whose name now holds other content too. A second writer racing
        us shows up then in its listing or in ours, so at least one of us refuses, as with
        a listing after each put. Raises (StorageError) when it cannot list: then nothing
        stored by the call is confirmed. With ``only``, the stored files outside it are
        not checked."""
        with self._lock:
            stored = [(w, d) for w, d in self._stored if only is None or w in only]
        conflicts: dict[str, IntegrityError] = {}
        listed: dict[str, dict[str, list[ArchivedFile]]] = {}
        for walfile, digest in stored:
            group = _name_group(walfile)
            if group not in listed:
                listed[group] = self._list(group)
            try:
                _refuse_conflicts(self.storage, walfile, digest,
                                  listed[group].get(walfile, []))
            except IntegrityError as exc:
                conflicts[walfile] = exc
        return conflicts


@dataclass(frozen=True)
class _Segment:
    name: wal.WalName
    data: bytes
    digest: str


def _read(path: Path) -> _Segment:
    name = wal.parse_wal_name(path.name)
    if name is None:
        raise UsageError(f"{path.name!r} is not a WAL file name PostgreSQL archives")
    try:
        # One segment (16 MB by default) in memory: hashed, checked, then encoded from it.
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return _Segment(name, data, hashlib.sha256(data).hexdigest())


def _store(known: _Known, segment: _Segment, stages: list[StageSpec],
           encoded: Callable[[], bytes] | None, started: float) -> PushResult:
    """``encoded``: the segment already encoded (shared by several repositories), or None
    to encode it on the way into the storage. Durable on return, but not yet checked
    against a second writer: the caller's ``known.confirm()`` does that for the call."""
    storage, cluster = known.storage, known.cluster
    name, data, digest = segment.name, segment.data, segment.digest
    if name.has_header:
        _check_segment(storage, cluster, name, data)

    existing = known.versions(name.name)
    _refuse_conflicts(storage, name.name, digest, existing)
    if existing:
        return PushResult(name.name, existing[0].key, len(data), existing[0].info.size, True,
                          time.monotonic() - started)

    key = wal_object_key(cluster, name.name, digest, pipeline.suffix(stages))
    if encoded is None:
        stored_size = store_artifact(storage, key, io.BytesIO(data), stages, name=name.name,
                                     format=WAL_FORMAT).size
    else:
        stored_size = storage.put(key, io.BytesIO(encoded())).size
    known.stored(name.name, digest)
    return PushResult(name.name, key, len(data), stored_size, False, time.monotonic() - started)


@dataclass(frozen=True)
class PushAhead:
    """A push of the file PostgreSQL asked for, and of the ready files pushed alongside it."""

    result: PushResult
    ahead: list[PushResult]  # stored and marked .done: PostgreSQL will not ask for them
    failed: dict[str, str]  # left .ready: PostgreSQL asks again, and that push reports


def push_ahead(storage: Storage, cluster: str, path: Path, stages: list[StageSpec], *,
               ahead: int, budget: int | None = None) -> PushAhead:
    """Push ``path`` and, in parallel, up to ``ahead`` other files the server marked ready.

    One process then archives several segments, instead of paying its start-up for each:
    while the load keeps the server writing, each push that ends makes room for the next
    ready file, up to ``budget`` files in all (default 8 x (1 + ahead)), so one start-up
    (the S3 client's is most of a second) serves a stream of segments with at most
    1 + ``ahead`` of them in memory. A file pushed ahead is marked done
    (archive_status/X.ready renamed to X.done) only once it is durably stored and a listing
    after its put found no other content under its name, every ``CONFIRM_EVERY`` files
    while the call goes on, so that pg_wal can let go of them; PostgreSQL (15+) skips files
    marked done by an archive_command. Only ``path``'s outcome decides the exit status.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    # Each push holds its segment in memory: with huge segments, one at a time.
    if ahead <= 0 or _size(path) > AHEAD_MAX_SEGMENT or not ready_files(path, 1):
        return PushAhead(push(storage, cluster, path, stages), [], {})
    total = budget if budget is not None else 8 * (1 + ahead)
    known = _Known(storage, cluster)
    seen = {path.name}
    unconfirmed: list[tuple[Path, PushResult]] = []  # stored, still .ready
    pushed: list[PushResult] = []
    failed: dict[str, str] = {}
    stop = False  # a refusal, or a repository that could not be listed: no more files

    def settle(batch: list[tuple[Path, PushResult]], conflicts: dict[str, IntegrityError]) -> None:
        for other, result in batch:
            if other.name in conflicts:
                failed[other.name] = str(conflicts[other.name])
                continue
            pushed.append(result)
            with contextlib.suppress(FileNotFoundError):
                status = other.parent / "archive_status"
                os.rename(status / f"{other.name}.ready", status / f"{other.name}.done")

    with ThreadPoolExecutor(max_workers=1 + ahead) as pool:
        asked = pool.submit(_push_one, known, path, stages)
        running: dict[Future[PushResult], Path] = {}

        def refill() -> None:
            room = min(ahead - len(running), total - len(seen))
            if room <= 0:
                return
            # Files stored but not yet marked done are still .ready: ``seen`` skips them.
            fresh = [p for p in ready_files(path, len(seen) + room) if p.name not in seen]
            for other in fresh[:room]:
                seen.add(other.name)
                running[pool.submit(_push_one, known, other, stages)] = other

        refill()
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                other = running.pop(future)
                try:
                    unconfirmed.append((other, future.result()))
                except Exception as exc:  # reported when PostgreSQL asks for this file itself
                    failed[other.name] = str(exc)
                    stop = True  # a repository that fails one file gets no more from us now
            if not stop:
                refill()
            if len(unconfirmed) >= CONFIRM_EVERY and running and not stop:
                # While the call goes on, its stored files are confirmed (one listing) and
                # marked done every few files: each one still .ready keeps its segment in
                # pg_wal, and a call can last for ``budget`` files.
                batch, unconfirmed = unconfirmed, []
                try:
                    conflicts = known.confirm({other.name for other, _ in batch})
                except Exception:
                    unconfirmed[:0] = batch  # left to the last listing, as a whole
                    stop = True
                else:
                    settle(batch, conflicts)
                    stop = bool(conflicts)
        wait([asked])
    # The last listing, once every put of the call has ended; only then is a file reported
    # archived (and marked done): a kill before leaves it .ready, pushed again.
    try:
        conflicts = known.confirm({path.name} | {other.name for other, _ in unconfirmed})
    except Exception:
        asked.result()  # the asked file's own error first, if it had one
        raise
    settle(unconfirmed, conflicts)
    result = asked.result()
    if path.name in conflicts:
        raise conflicts[path.name]
    return PushAhead(result, pushed, failed)


# Stored files confirmed (one listing of their names) and marked done at a time while a
# push-ahead call goes on: fewer means more listings, more means more segments held in
# pg_wal beyond the ones being pushed.
CONFIRM_EVERY = 2
AHEAD_MAX_SEGMENT = 64 << 20


# ------------------------------------------------------------ every WAL repository
#
# With `[[repos]]` entries marked wal = true, a segment goes to each of them. The rule
# for partial success: wal-push exits 0 once the segment is durable in at least one WAL
# repository *and* every repository that lacks it has a backlog marker there
# (``wal/<cluster>/backlog/<repo>/<walfile>``, beside the segment). The archive contract
# (exit 0 only for a file that recovery can get back) then holds: wal-fetch reads from
# whichever repository has it. Waiting for all of them would let one outage fill pg_wal
# and stop the database; waiting for the primary would make the primary's outage stop
# archiving. A repository that refuses the file (other content, another system) fails
# the push everywhere: only an unreachable one is left behind. Later pushes copy its
# backlog to it, stored bytes as they are, once it answers again.


@dataclass(frozen=True)
class WalRepo:
    """One repository wal-push archives to: its `[[repos]]` name and its storage."""

    name: str
    storage: Storage


@dataclass(frozen=True)
class Spread:
    """Where one WAL file went: the repositories that hold it, and why the others do not."""

    walfile: str
    result: PushResult | None  # as the first repository holding it reported
    stored_in: list[str]
    behind: dict[str, str]  # repository -> why it lacks the file (now in its backlog)
    error: BaseException | None = None  # set when no repository holds it

    @property
    def archived(self) -> bool:
        return self.error is None and self.result is not None


@dataclass(frozen=True)
class MultiPush:
    """A push to every WAL repository: the file PostgreSQL asked for, the ones pushed
    ahead (marked done), and the backlog caught up meanwhile."""

    asked: Spread
    ahead: list[Spread]
    caught_up: dict[str, int]  # repository -> backlog files copied to it
    catch_up_errors: dict[str, str]


def unreachable(exc: BaseException) -> bool:
    """A failure that makes a repository fall behind rather than refuse the file."""
    return isinstance(exc, OSError | StorageError) and not isinstance(exc, NotFound)


class _Hints:
    """When each repository last failed, in a local folder: a hint, not a record (the
    backlog markers are the record), so that a repository that is down is skipped for
    ``retry_seconds`` instead of costing every push its io_timeout."""

    def __init__(self, folder: Path | None, cluster: str, retry_seconds: float) -> None:
        self.folder, self.cluster, self.retry = folder, cluster, retry_seconds

    def _path(self, repo: WalRepo) -> Path | None:
        if self.folder is None:
            return None
        tag = hashlib.sha256(f"{repo.storage.url}\0{self.cluster}".encode()).hexdigest()[:20]
        return self.folder / f"pgvault-wal-down-{os.getuid()}-{tag}"

    def down_since(self, repo: WalRepo) -> float | None:
        path = self._path(repo)
        if path is None or self.retry <= 0:
            return None
        try:
            failed = path.stat().st_mtime
        except OSError:
            return None
        return failed if time.time() - failed < self.retry else None

    def failed(self, repo: WalRepo) -> None:
        path = self._path(repo)
        if path is not None:
            with contextlib.suppress(OSError):
                path.touch()
                os.utime(path)

    def answered(self, repo: WalRepo) -> None:
        path = self._path(repo)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def push_everywhere(repos: list[WalRepo], cluster: str, path: Path, stages: list[StageSpec],
                    *, ahead: int, retry_seconds: float = 30.0, hints: Path | None = None,
                    catch_up: int | None = None) -> MultiPush:
    """Push ``path`` (and up to ``ahead`` other ready files) to every repository in
    ``repos``; record a backlog for each one left behind; copy backlog to each that
    answered (up to ``catch_up`` files, default 4 x (1 + ahead)).

    Raises the asked file's error when no repository holds it, or when one refused it.
    """
    from concurrent.futures import ThreadPoolExecutor

    state = _Hints(hints, cluster, retry_seconds)
    skipped = {r.name: f"skipped: its last push failed {time.time() - since:.0f}s ago "
               f"(retried after {retry_seconds:g}s)"
               for r in repos if (since := state.down_since(r)) is not None}
    live = [r for r in repos if r.name not in skipped]
    others = ready_files(path, ahead) if _size(path) <= AHEAD_MAX_SEGMENT else []
    failed_repos: set[str] = set()
    knowns = {r.name: _Known(r.storage, cluster) for r in live}
    with ThreadPoolExecutor(max_workers=1 + len(others)) as pool:
        asked = pool.submit(_spread, live, skipped, knowns, path, stages)
        extra = {other: pool.submit(_spread, live, skipped, knowns, other, stages)
                 for other in others}
        puts = [asked.result()] + [f.result() for f in extra.values()]
    # One listing per repository for the whole call, once all its puts have ended.
    with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
        checks = {r.name: pool.submit(knowns[r.name].confirm) for r in live}
        for name, check in checks.items():
            try:
                conflicts = check.result()
            except Exception as exc:
                for put in puts:
                    put.unconfirmed(name, exc)
                continue
            for put in puts:
                if put.walfile in conflicts:
                    put.refused = put.refused or conflicts[put.walfile]
    spreads = [_settle(repos, cluster, put) for put in puts]
    for spread in spreads:
        failed_repos.update(name for name in spread.behind if name not in skipped)
    pushed = []
    for other, spread in zip(others, spreads[1:], strict=True):
        if not spread.archived:
            continue  # left .ready: PostgreSQL asks for it again, and that push reports
        pushed.append(spread)
        with contextlib.suppress(FileNotFoundError):
            status = other.parent / "archive_status"
            os.rename(status / f"{other.name}.ready", status / f"{other.name}.done")
    for repo in live:
        if repo.name in failed_repos:
            state.failed(repo)
        else:
            state.answered(repo)
    healthy = [r for r in live if r.name not in failed_repos]
    # Stored bytes copied as they are (no compression): cheap enough that a push can bring
    # over several times what it archives, so a backlog shrinks even under load.
    limit = catch_up if catch_up is not None else 4 * (1 + ahead)
    caught, errors = (_catch_up(healthy, cluster, limit, knowns) if len(repos) > 1
                      else ({}, {}))
    first = spreads[0]
    if not first.archived:
        assert first.error is not None
        raise first.error
    return MultiPush(first, pushed, caught, errors)


@dataclass
class _Puts:
    """One file's puts to every live repository, before the call's confirmation."""

    walfile: str
    results: dict[str, PushResult]
    behind: dict[str, str]
    refused: BaseException | None = None
    down: BaseException | None = None

    def unconfirmed(self, name: str, exc: BaseException) -> None:
        """Repository ``name`` could not be listed after the puts: whatever this file's put
        there did, it counts as not stored (a refusal when the failure is not an outage)."""
        if name not in self.results or self.results[name].already_archived:
            return
        del self.results[name]
        if unreachable(exc):
            self.behind[name] = str(exc)
            self.down = self.down or exc
        else:
            self.refused = self.refused or exc


def _spread(live: list[WalRepo], skipped: dict[str, str], knowns: dict[str, _Known],
            path: Path, stages: list[StageSpec]) -> _Puts:
    """One file to every live repository at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    try:
        segment = _read(path)
    except Exception as exc:
        return _Puts(path.name, {}, {}, refused=exc)
    lock = threading.Lock()
    cache: list[bytes] = []

    def encoded() -> bytes:
        # Compressed (and encrypted) once, however many repositories store it.
        with lock:
            if not cache:
                reader = pipeline.encode(io.BytesIO(segment.data), stages)
                cache.append(b"".join(iter(lambda: reader.read(CHUNK), b"")))
            return cache[0]

    puts = _Puts(segment.name.name, {}, dict(skipped))
    share = encoded if len(live) > 1 else None
    with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
        futures = {r.name: pool.submit(_store, knowns[r.name], segment, stages, share,
                                       started) for r in live}
        for name, future in futures.items():
            try:
                puts.results[name] = future.result()
            except Exception as exc:
                if unreachable(exc):
                    puts.behind[name] = str(exc)
                    puts.down = puts.down or exc
                else:
                    puts.refused = puts.refused or exc
    return puts


def _settle(repos: list[WalRepo], cluster: str, puts: _Puts) -> Spread:
    """Where one confirmed file went; backlog markers for the repositories that lack it."""
    walfile, results, behind = puts.walfile, puts.results, puts.behind
    stored_in = [r.name for r in repos if r.name in results]
    if puts.refused is not None:
        return Spread(walfile, None, stored_in, behind, puts.refused)
    if not stored_in:
        error = puts.down or StorageError(f"{walfile} reached no WAL repository: "
                                          + "; ".join(behind.values()))
        return Spread(walfile, None, [], behind, error)
    if behind:
        holders = [r for r in repos if r.name in results]
        recorded = 0
        for holder in holders:
            try:
                for name in behind:
                    Catalog(holder.storage).add_wal_backlog(cluster, name, walfile)
                recorded += 1
            except Exception as exc:  # another holder may record it
                if not unreachable(exc):
                    raise
        if not recorded:
            return Spread(walfile, None, stored_in, behind, StorageError(
                f"{walfile} is stored in {', '.join(stored_in)}, but its backlog for "
                f"{', '.join(behind)} could not be recorded there"))
    return Spread(walfile, results[stored_in[0]], stored_in, behind)


def _catch_up(healthy: list[WalRepo], cluster: str, limit: int,
              knowns: dict[str, _Known] | None = None
              ) -> tuple[dict[str, int], dict[str, str]]:
    """Copy up to ``limit`` backlog files to each repository in ``healthy`` from one that
    holds them (their markers say so), then drop those markers. ``knowns``: the listings
    the call's push made (by repository name), so a group listed then is not listed again."""
    from concurrent.futures import ThreadPoolExecutor

    caught: dict[str, int] = {}
    errors: dict[str, str] = {}
    if limit <= 0 or len(healthy) < 2:
        return caught, errors
    # Who holds which marker: every healthy repository lists its markers once.
    holders: dict[tuple[str, str], list[WalRepo]] = {}
    for repo in healthy:
        try:
            markers = Catalog(repo.storage).wal_backlog(cluster)
        except Exception as exc:
            errors[repo.name] = f"listing its backlog markers: {exc}"
            continue
        for marker in markers:
            holders.setdefault((marker.repo, marker.walfile), []).append(repo)
    jobs = []
    for target in healthy:
        wanted = sorted((w for (name, w) in holders if name == target.name),
                        key=lambda n: (not n.endswith(".history"), n))[:limit]
        jobs += [(target, walfile, holders[(target.name, walfile)]) for walfile in wanted]
    if not jobs:
        return caught, errors
    bound: set[str] = set()
    # One listing per name group in each repository, as for a push (not one per backlog
    # file at the source and one at the target), and one after the copies at each target.
    knowns = {r.name: (knowns or {}).get(r.name) or _Known(r.storage, cluster)
              for r in healthy}

    def copy(target: WalRepo, walfile: str, sources: list[WalRepo]) -> bool:
        """False: there is nothing left to bring over, and the marker is gone."""
        source = sources[0]
        found = knowns[source.name].versions(walfile)
        if not found:  # pruned there since
            Catalog(source.storage).clear_wal_backlog(cluster, target.name, [walfile])
            return False
        if len({v.sha256 for v in found}) != 1:
            raise IntegrityError(f"{walfile} has {len(found)} versions in {source.name}")
        version = found[0]
        if target.name not in bound and version.wal.has_header:
            identity = read_identity(source.storage, cluster)
            if identity is not None:
                check_identity(target.storage, cluster, identity.system_identifier,
                               identity.wal_segment_size, bind=True)
            bound.add(target.name)
        have = knowns[target.name].versions(walfile)
        _refuse_conflicts(target.storage, walfile, version.sha256, have)
        if not have:
            with source.storage.open(version.key) as stream:
                info = target.storage.put(version.key, stream)
            if info.size != version.info.size:
                target.storage.delete([version.key])
                raise IntegrityError(f"{walfile} arrived in {target.name} with {info.size} "
                                     f"bytes instead of {version.info.size}")
            knowns[target.name].stored(walfile, version.sha256)
        return True

    copied: dict[str, list[tuple[str, list[WalRepo]]]] = {}
    with ThreadPoolExecutor(max_workers=min(4, len(jobs))) as pool:
        futures = [(t, w, src, pool.submit(copy, t, w, src)) for t, w, src in jobs]
        for target, walfile, sources, future in futures:
            try:
                if future.result():
                    copied.setdefault(target.name, []).append((walfile, sources))
                else:
                    caught[target.name] = caught.get(target.name, 0) + 1
            except Exception as exc:
                errors.setdefault(target.name, str(exc))
    # A marker goes only once the target's listing after every copy shows no other content
    # under the name (a second writer racing a copy): until then the backlog keeps it.
    for target in healthy:
        if target.name not in copied:
            continue
        try:  # the push's own files were confirmed before: only the copies are checked
            conflicts = knowns[target.name].confirm({w for w, _ in copied[target.name]})
        except Exception as exc:
            errors.setdefault(target.name, f"listing it after the copies: {exc}")
            continue
        for walfile in conflicts:
            errors.setdefault(target.name, str(conflicts[walfile]))
        confirmed = [(w, src) for w, src in copied[target.name] if w not in conflicts]
        by_holder: dict[str, tuple[WalRepo, list[str]]] = {}
        for walfile, sources in confirmed:
            for holder in sources:
                by_holder.setdefault(holder.name, (holder, []))[1].append(walfile)
        try:
            for holder, walfiles in by_holder.values():
                Catalog(holder.storage).clear_wal_backlog(cluster, target.name, walfiles)
        except Exception as exc:
            errors.setdefault(target.name, str(exc))
            continue
        if confirmed:
            caught[target.name] = caught.get(target.name, 0) + len(confirmed)
    return caught, errors


@dataclass(frozen=True)
class RepoBacklog:
    """What one WAL repository lacks: the files other repositories hold for it."""

    repo: str
    walfiles: list[str]
    oldest_at: datetime | None  # when the oldest of them was left behind
    reachable: bool = True  # False: its own listing failed (its markers elsewhere unknown)

    def oldest_seconds(self, now: datetime) -> float:
        return (now - self.oldest_at).total_seconds() if self.oldest_at else 0.0


def backlog(repos: list[WalRepo], cluster: str) -> list[RepoBacklog]:
    """Each WAL repository's backlog, from the markers every reachable repository holds."""
    from concurrent.futures import ThreadPoolExecutor

    found: dict[str, dict[str, datetime]] = {r.name: {} for r in repos}
    reachable: dict[str, bool] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(repos))) as pool:
        listings = {r.name: pool.submit(Catalog(r.storage).wal_backlog, cluster) for r in repos}
        for name, future in listings.items():
            try:
                markers = future.result()
            except Exception:
                reachable[name] = False
                continue
            reachable[name] = True
            for marker in markers:
                seen = found.setdefault(marker.repo, {})
                when = marker.info.modified
                seen[marker.walfile] = min(when, seen.get(marker.walfile, when))
    return [RepoBacklog(name, sorted(files), min(files.values(), default=None),
                        reachable.get(name, True))
            for name, files in found.items()]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def ready_files(path: Path, limit: int) -> list[Path]:
    """Up to ``limit`` WAL files besides ``path`` waiting in its folder's archive_status,
    in the archiver's order (timeline history files first, then by name)."""
    if limit <= 0:
        return []
    try:
        entries = os.listdir(path.parent / "archive_status")
    except OSError:
        return []  # not a server's pg_wal (a copy, a test): nothing to look ahead at
    names = sorted((n[: -len(".ready")] for n in entries if n.endswith(".ready")),
                   key=lambda n: (not n.endswith(".history"), n))
    return [path.parent / n for n in names
            if n != path.name and wal.parse_wal_name(n) is not None][:limit]


def _check_segment(storage: Storage, cluster: str, name: wal.WalName, data: bytes) -> None:
    header = wal.read_segment_header(data)
    if header is None:
        raise IntegrityError(f"REFUSED: {name.name} does not start with a WAL segment header")
    size = header.segment_size
    if len(data) != size or header.page_address != name.segno(size) * size:
        raise IntegrityError(
            f"REFUSED: {name.name} is {len(data)} bytes and starts at "
            f"{wal.format_lsn(header.page_address)}, which is not the segment its name says"
        )
    check_identity(storage, cluster, str(header.system_identifier), size, bind=True)


def _refuse_conflicts(storage: Storage, walfile: str, digest: str,
                      existing: list[ArchivedFile]) -> None:
    other = [v for v in existing if v.sha256 != digest]
    if other:
        raise IntegrityError(
            f"REFUSED: {walfile} is already archived in {storage.url} with different content "
            f"(sha256 {other[0].sha256[:12]}..., this one {digest[:12]}...): two servers are "
            "writing the same timeline (split brain?); this segment was not archived"
        )


def fetch(storage: Storage, cluster: str, walfile: str, target: Path, *,
          identities: Keyring | None = None) -> int:
    """Write the archived ``walfile`` to ``target``; NotFound if it was never archived.

    The decoded bytes must hash to the sha256 the key names; otherwise ``target`` is
    removed and IntegrityError raised.
    """
    found = versions(storage, cluster, walfile)
    if not found:
        raise NotFound(f"{walfile} is not in the archive of cluster {cluster!r}")
    if len({v.sha256 for v in found}) > 1:
        raise IntegrityError(f"{walfile} has {len(found)} different archived versions "
                             "(split brain); restore it by hand from the one you trust")
    version = found[0]
    digest = hashlib.sha256()
    size = 0
    try:
        with storage.open(version.key) as stored, open(target, "wb") as out:
            decoded = pipeline.decode(stored, stages_of_suffix(version.suffix),
                                      identities=identities,
                                      what=f"archived {walfile}")
            while chunk := decoded.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if digest.hexdigest() != version.sha256:
            raise IntegrityError(f"archived {walfile} is damaged: sha256 does not match its key "
                                 f"{version.key}")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return size


def fetch_any(repos: list[WalRepo], cluster: str, walfile: str, target: Path, *,
              identities: Keyring | None = None) -> tuple[str, int]:
    """``fetch`` from the first repository in ``repos`` that has ``walfile``: (its name,
    the size). NotFound only when every repository answered that it does not have it; a
    repository that could not answer (or holds damaged bytes) makes its error the result
    when no other has the file, because recovery must not end early on an outage."""
    trouble: BaseException | None = None
    for repo in repos:
        try:
            return repo.name, fetch(repo.storage, cluster, walfile, target,
                                    identities=identities)
        except NotFound:
            continue
        except (StorageError, IntegrityError, OSError) as exc:
            trouble = trouble or exc
    if trouble is not None:
        raise trouble
    raise NotFound(f"{walfile} is not in the archive of cluster {cluster!r} "
                   f"in {', '.join(r.name for r in repos)}")


def wait_for(storage: Storage, cluster: str, names: list[str], *, timeout: float,
             sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Wait until every WAL file in ``names`` is archived; the ones still missing at timeout."""
    deadline = time.monotonic() + timeout
    missing = list(names)
    delay = 0.1
    while True:
        missing = [n for n in missing if not versions(storage, cluster, n)]
        if not missing or time.monotonic() >= deadline:
            return missing
        sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 2, 2.0)


def archive_status(storage: Storage, cluster: str, backups: list[Manifest]) -> ArchiveStatus:
    """Timelines, gaps and the recoverable window of ``cluster`` (``backups``: its manifests)."""
    identity = read_identity(storage, cluster)
    files, markers = Catalog(storage).wal_listing(cluster)
    behind: dict[str, tuple[int, datetime | None]] = {}
    for marker in markers:
        count, since = behind.get(marker.repo, (0, None))
        when = marker.info.modified
        behind[marker.repo] = (count + 1, when if since is None else min(since, when))
    segments = [f for f in files if f.wal.kind == "segment"]
    size = identity.wal_segment_size if identity else 16 << 20
    by_timeline: dict[int, list[ArchivedFile]] = {}
    for item in segments:
        by_timeline.setdefault(item.wal.timeline, []).append(item)
    timelines = []
    for timeline, items in sorted(by_timeline.items()):
        numbers = sorted({i.wal.segno(size) for i in items})
        gaps = [(wal.segment_name(timeline, a + 1, size), wal.segment_name(timeline, b - 1, size))
                for a, b in itertools.pairwise(numbers) if b - a > 1]
        timelines.append(TimelineRange(timeline, wal.segment_name(timeline, numbers[0], size),
                                       wal.segment_name(timeline, numbers[-1], size),
                                       len(numbers), gaps))
    newest = max(segments, key=lambda f: (f.wal.segno(size), f.wal.timeline), default=None)
    physical = [m for m in backups if m.physical is not None]
    earliest = min((m.physical.stop_time for m in physical if m.physical), default=None)
    latest = None
    if newest is not None and physical and not any(t.gaps for t in timelines):
        latest = newest.info.modified
    return ArchiveStatus(
        cluster=cluster, identity=identity, timelines=timelines, files=len(files),
        stored_bytes=sum(f.info.size for f in files),
        last_wal=newest.wal.name if newest else None,
        last_archived_at=max((f.info.modified for f in segments), default=None),
        earliest_restore=earliest, latest_restore=latest,
        failures=push_failures(storage, cluster), backlog=behind,
    )


def prunable(storage: Storage, cluster: str, keep_from: str) -> list[ArchivedFile]:
    """WAL objects older than the segment ``keep_from`` (on any timeline); history files stay."""
    identity = read_identity(storage, cluster)
    if identity is None:
        return []
    size = identity.wal_segment_size
    first = wal.parse_wal_name(keep_from)
    if first is None:
        raise ValueError(f"not a WAL segment name: {keep_from!r}")
    limit = first.segno(size)
    return [f for f in archived(storage, cluster)
            if f.wal.kind != "history" and f.wal.segno(size) < limit]


def record_push_failure(storage: Storage, cluster: str, walfile: str, error: str,
                        now: datetime) -> None:
    """Count a failed push where monitoring reads it; best effort (storage may be the cause)."""
    from pgvault.redact import scrub

    with contextlib.suppress(Exception):
        Catalog(storage).record_wal_push_failure(cluster, walfile, scrub(error)[:500], now)


def push_failures(storage: Storage, cluster: str) -> PushFailures:
    return Catalog(storage).wal_push_failures(cluster)


@dataclass(frozen=True)
class ArchiveCheck:
    """The result of ``check-archive``: the segment switched to and how long it took to arrive."""

    walfile: str
    seconds: float
    archiver: dict[str, object]


def check_archive(conn: ConnInfo, storage: Storage, cluster: str, *,
                  timeout: float) -> ArchiveCheck:
    """Force a WAL switch and wait until the finished segment is in the repository."""
    import psycopg

    # Lazily: wal-push, which imports this module, never needs the engine.
    from pgvault.engines.physical import archiver_stats, switch_wal, system_identity

    with conn.connect(autocommit=True) as connection:
        try:
            system_identifier, segment_size = system_identity(connection)
            walfile = switch_wal(connection)
        except psycopg.Error as exc:
            raise BackupFailed(f"cannot switch WAL on {conn.redacted()}: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        check_identity(storage, cluster, system_identifier, segment_size, bind=False)
        started = time.monotonic()
        missing = wait_for(storage, cluster, [walfile], timeout=timeout)
        archiver = archiver_stats(connection)
        cause = _archive_command_problem(connection, system_identifier) if missing else None
    if missing:
        failure = ""
        if archiver["last_failed_wal"]:
            failure = (f"; the server's last archive failure was {archiver['last_failed_wal']} "
                       f"at {archiver['last_failed_time']}")
        raise BackupFailed(
            f"WAL archiving is not working: {walfile} did not arrive in {storage.url} "
            f"within {timeout:.0f}s{failure}; "
            + (cause or "check archive_mode and archive_command (and the server's log)")
        )
    return ArchiveCheck(walfile, time.monotonic() - started, archiver)


def _archive_command_problem(connection: psycopg.Connection[Any],
                             system_identifier: str) -> str | None:
    """Why the server's OS user cannot run its archive_command, when the server is local.

    Best effort: settings a role may not read, or a server on another machine, give None
    (the generic advice stands).
    """
    import psycopg

    from pgvault.engines.physical import archive_settings
    from pgvault.ops import archive_access

    try:
        settings = archive_settings(connection)
    except psycopg.Error:
        return None
    mode, command, library = settings.mode, settings.command, settings.library
    if mode == "off":
        return "archive_mode is off on the server (set it on and restart the server)"
    if library:
        return f"the server archives with archive_library {library!r}, not archive_command"
    if not command or not command.strip():
        return "archive_command is empty on the server"
    host = connection.info.host
    loopback = host.startswith("/") or host in ("localhost", "::1") or host.startswith("127.")
    server = archive_access.local_server(
        str(settings.data_directory), system_identifier,
        backend_pid=connection.info.backend_pid if loopback else None)
    return archive_access.diagnose(command, server) if server is not None else None


def pgvault_executable() -> str:
    """The pgvault program to write into archive_command and restore_command."""
    import sys

    sibling = Path(sys.executable).with_name("pgvault")
    return str(sibling) if os.access(sibling, os.X_OK) else "pgvault"

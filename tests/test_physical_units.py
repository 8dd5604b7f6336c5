"""The parts of physical backups that need no server: WAL names, the tar watcher, WAL pruning."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgvault.catalog import Catalog, parse_wal_key, wal_identity_key, wal_object_key
from pgvault.engines.physical import TarWatcher, needed_wal, unpack
from pgvault.errors import IntegrityError, UsageError
from pgvault.model import Artifact, Manifest, PhysicalFacts
from pgvault.ops.physical_restore import RecoveryTarget
from pgvault.ops.prune import prune
from pgvault.ops.wal import archived, record_push_failure, stages_of_suffix
from pgvault.pg import wal
from pgvault.retention import Duration, Policy
from pgvault.storage.memory import MemoryStorage

MB = 1 << 20


def test_lsns_and_wal_file_names_follow_postgresql() -> None:
    assert wal.parse_lsn("16/B374D848") == 0x16B374D848
    assert wal.format_lsn(0x16B374D848) == "16/B374D848"
    with pytest.raises(UsageError):
        wal.parse_lsn("16-B374D848")
    # 16 MB segments: 256 per "log"; 1 MB segments: 4096 per log.
    assert wal.segment_name(1, wal.segment_of(0x16B374D848, 16 * MB), 16 * MB) == \
        "0000000100000016000000B3"
    assert wal.segment_name(2, 4096 + 5, MB) == "000000020000000100000005"
    # An end LSN on a segment boundary ends in the segment before it.
    assert wal.last_segment_of(3 * MB, MB) == 2 and wal.segment_of(3 * MB, MB) == 3

    segment = wal.parse_wal_name("000000020000000100000005")
    assert segment is not None and (segment.timeline, segment.kind) == (2, "segment")
    assert segment.segno(MB) == 4096 + 5 and segment.has_header
    partial = wal.parse_wal_name("000000010000000000000003.partial")
    label = wal.parse_wal_name("000000010000000000000003.00000028.backup")
    history = wal.parse_wal_name("00000002.history")
    assert partial and partial.kind == "partial" and partial.has_header
    assert label and label.kind == "backup" and not label.has_header
    assert history and (history.kind, history.timeline) == ("history", 2)
    for junk in ("00000001000000000000000G", "000000010000000000000003.tmp", "RECOVERYXLOG",
                 "archive_status", "00000002.HISTORY"):
        assert wal.parse_wal_name(junk) is None, junk


def test_wal_keys_name_the_content_and_say_how_to_decode_it() -> None:
    digest = hashlib.sha256(b"segment").hexdigest()
    key = wal_object_key("app cluster", "000000010000000000000003", digest, ".zst.age")
    assert key == f"wal/app%20cluster/00000001/000000010000000000000003/{digest}.zst.age"
    assert parse_wal_key(key) == ("app cluster", "000000010000000000000003", digest, ".zst.age")
    assert parse_wal_key("wal/main/identity.json") is None
    assert [s.name for s in stages_of_suffix(".zst.age")] == ["zstd", "age"]
    assert stages_of_suffix("") == [] and stages_of_suffix(".gz")[0].name == "gzip"


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 512, 100_000])
def test_tar_watcher_passes_bytes_through_and_keeps_the_named_members(chunk: int) -> None:
    label = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    members = {
        "base/1/1259": b"x" * 70_000,
        "backup_label": label,
        "./global/pg_control": (12345).to_bytes(8, "little") + b"\0" * 8184,
        "tablespace_map": b"",
        "deep/" + "d" * 120 + "/file": b"long name in the ustar prefix",
        "backup_manifest": b'{"WAL-Ranges": []}' * 1000,
    }
    raw = _tar(members)
    watcher = TarWatcher(io.BytesIO(raw), {"backup_label": 1 << 20,
                                           "global/pg_control": 1 << 20,
                                           "backup_manifest": 10,  # too large: not kept
                                           "tablespace_map": 10})
    out = b"".join(iter(lambda: watcher.read(chunk), b""))
    assert out == raw
    assert watcher.members == {"backup_label": label, "tablespace_map": b"",
                               "global/pg_control": members["./global/pg_control"]}
    assert wal.control_system_identifier(watcher.members["global/pg_control"]) == 12345


def test_recovery_targets_are_one_at_a_time_and_become_postgresql_settings() -> None:
    when = datetime(2026, 11, 25, 9, 14, tzinfo=UTC)
    assert RecoveryTarget(time=when, action="pause").settings() == {
        "recovery_target_time": "2026-11-25T09:14:00+00:00",
        "recovery_target_action": "pause", "recovery_target_inclusive": "on",
        "recovery_target_timeline": "latest"}
    assert RecoveryTarget(name="before").settings()["recovery_target_name"] == "before"
    assert RecoveryTarget(immediate=True).settings()["recovery_target"] == "immediate"
    assert RecoveryTarget().settings() == {"recovery_target_timeline": "latest"}
    assert RecoveryTarget(action="pause").effective_action == "promote"  # no target: the end
    for bad in ({"time": when, "lsn": "0/1"}, {"time": when.replace(tzinfo=None)},
                {"lsn": "nope"}, {"xid": "12a"}, {"action": "explode"}):
        with pytest.raises(UsageError):
            RecoveryTarget(**bad)  # type: ignore[arg-type]


def _physical(backup_id: str, start_seg: int, stop: datetime) -> Manifest:
    size = MB
    facts = PhysicalFacts(
        system_identifier="7", wal_segment_size=size, timeline=1,
        start_lsn=wal.format_lsn(start_seg * size + 0x28),
        stop_lsn=wal.format_lsn((start_seg + 1) * size + 0x100),
        start_wal=wal.segment_name(1, start_seg, size),
        stop_wal=wal.segment_name(1, start_seg + 1, size), stop_timeline=1, stop_time=stop,
        wal_included=False)
    return Manifest(id=backup_id, kind="physical", database="main", started_at=stop,
                    finished_at=stop, pgvault_version="test", physical=facts,
                    artifacts=[Artifact(name="base.tar", key=f"backups/main/{backup_id}/base.tar",
                                        size=0, sha256="0" * 64, raw_size=0)])


def _archive(storage: MemoryStorage, names: list[str]) -> None:
    storage.put_bytes(wal_identity_key("main"),
                      json.dumps({"system_identifier": "7", "wal_segment_size": MB}).encode())
    for name in names:
        digest = hashlib.sha256(name.encode()).hexdigest()
        storage.put_bytes(wal_object_key("main", name, digest, ".zst"), b"wal")


def test_prune_removes_wal_older_than_every_kept_base_backup_and_nothing_they_need() -> None:
    storage = MemoryStorage()
    now = datetime(2026, 11, 25, tzinfo=UTC)
    backups = [_physical(f"2026112{i}T000000.000Z-00000{i}", start, now - timedelta(days=days))
               for i, (start, days) in enumerate([(5, 10), (10, 5), (15, 1)], start=1)]
    catalog = Catalog(storage)
    for manifest in backups:
        catalog.commit(manifest)
    names = [wal.segment_name(1, n, MB) for n in range(1, 21)]
    names += ["00000002.history", wal.segment_name(1, 5, MB) + ".00000028.backup",
              wal.segment_name(1, 12, MB) + ".00000028.backup"]
    _archive(storage, names)

    # The window opens 7 days back: the backup that ended 10 days ago is its start point.
    windowed = prune(storage, Policy(last=1, daily=0, weekly=0, monthly=0), dry_run=True,
                     now=now, lock_stale_after=timedelta(hours=1),
                     recovery_window=Duration(days=7))
    assert windowed.databases["main"].remove == [] and windowed.wal == [
        f.key for f in archived(storage, "main") if f.wal.segno(MB) < 5
        and f.wal.kind != "history"]

    report = prune(storage, Policy(last=2, daily=0, weekly=0, monthly=0), dry_run=False,
                   now=now, lock_stale_after=timedelta(hours=1))
    assert [d.id for d in report.databases["main"].remove] == [backups[0].id]
    left = sorted(f.wal.name for f in archived(storage, "main"))
    assert left == sorted([wal.segment_name(1, n, MB) for n in range(10, 21)]
                          + ["00000002.history",
                             wal.segment_name(1, 12, MB) + ".00000028.backup"])
    assert len(report.wal) == 9 + 1  # segments 1..9 and the old .backup label
    assert "archived WAL file" in report.summary()
    kept = catalog.get(backups[1].id, "main")
    assert kept.physical is not None
    assert set(needed_wal(kept.physical, None)) <= set(left)


def test_prune_leaves_the_archive_alone_without_a_base_backup() -> None:
    storage = MemoryStorage()
    _archive(storage, [wal.segment_name(1, n, MB) for n in range(1, 5)])
    report = prune(storage, Policy(last=1), dry_run=False, now=datetime.now(UTC),
                   lock_stale_after=timedelta(hours=1))
    assert report.wal == [] and len(archived(storage, "main")) == 4


def test_status_reads_the_archive_gaps_staleness_and_recoverable_window() -> None:
    from pgvault.metrics import Metrics
    from pgvault.ops.status import WARNING, database_status

    storage = MemoryStorage()
    stop = datetime.now(UTC) - timedelta(hours=2)
    Catalog(storage).commit(_physical("20261125T000000.000Z-000001", 3, stop))
    _archive(storage, [wal.segment_name(1, n, MB) for n in (3, 4, 5, 8, 9)])
    record_push_failure(storage, "main", wal.segment_name(1, 10, MB), "REFUSED: split brain",
                        datetime.now(UTC) + timedelta(seconds=1))
    status = database_status(storage, "main", rpo_hours=24, rto_minutes=60,
                             archive_stale_after=timedelta(microseconds=1))
    assert status.archive is not None
    assert status.archive.gaps == [(wal.segment_name(1, 6, MB), wal.segment_name(1, 7, MB))]
    assert status.archive.last_wal == wal.segment_name(1, 9, MB)
    assert status.archive.earliest_restore == stop and status.archive.latest_restore is None
    verdict = status.verdict(datetime.now(UTC) + timedelta(seconds=1))
    assert verdict.state == WARNING
    assert any("gap" in r for r in verdict.reasons) and any("stale" in r for r in verdict.reasons)
    assert any("wal-push of" in r and "split brain" in r for r in verdict.reasons)
    document = status.to_json(datetime.now(UTC))["archive"]
    assert document["gaps"] == [[wal.segment_name(1, 6, MB), wal.segment_name(1, 7, MB)]]
    metrics = Metrics()
    metrics.update(status)
    text = metrics.render().decode()
    assert 'pgvault_wal_archive_gaps{database="main"} 1.0' in text
    assert "pgvault_wal_last_archived_timestamp_seconds" in text
    assert 'pgvault_wal_push_failures{database="main"} 1.0' in text


# ---------------------------------------------------------------- unpacking a hostile tar
# Built here with tarfile and unpacked by the code restore --physical runs, on this venv's
# interpreter (Debian 12's 3.11.2 has no extraction filters).


def _entry(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"",
           link: str = "", mode: int = 0o600) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.size = kind, link, mode, len(data)
    if kind == tarfile.DIRTYPE:
        info.mode = 0o700 if mode == 0o600 else mode
    return info, data


def _hostile(*entries: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buffer.seek(0)
    return buffer


def _files_outside(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if not p.is_relative_to(tmp_path / "pgdata"))


def test_unpack_restores_a_base_backup_with_sane_modes_and_inside_links(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    unpack(_hostile(_entry("./", tarfile.DIRTYPE),
                    _entry("PG_VERSION", data=b"15\n", mode=0o4777),
                    _entry("base", tarfile.DIRTYPE, mode=0o1777),
                    _entry("base/1", tarfile.DIRTYPE),
                    _entry("base/1/1259", data=b"x" * 9000, mode=0o640),
                    _entry("base/1/alias", tarfile.SYMTYPE, link="1259"),
                    _entry("base/same", tarfile.LNKTYPE, link="base/1/1259", mode=0o640),
                    _entry("wal", tarfile.SYMTYPE, link="base/1")),
           pgdata, owner=None)
    assert (pgdata / "PG_VERSION").read_bytes() == b"15\n"
    assert (pgdata / "base/1/alias").read_bytes() == b"x" * 9000
    assert (pgdata / "base/same").stat().st_ino == (pgdata / "base/1/1259").stat().st_ino
    assert (pgdata / "wal").resolve() == (pgdata / "base/1").resolve()
    # No setuid, sticky, world or group-write bits in a data folder.
    assert stat.S_IMODE((pgdata / "PG_VERSION").stat().st_mode) == 0o750
    assert stat.S_IMODE((pgdata / "base").stat().st_mode) == 0o750
    assert stat.S_IMODE((pgdata / "base/1/1259").stat().st_mode) == 0o640
    assert stat.S_IMODE(pgdata.stat().st_mode) == 0o700


HOSTILE = {
    "absolute path": [_entry("/tmp/pgvault-hostile-abs", data=b"evil")],
    "dot-dot": [_entry("../escaped", data=b"evil")],
    "dot-dot inside": [_entry("base/../../escaped", data=b"evil")],
    "absolute symlink": [_entry("etc", tarfile.SYMTYPE, link="/etc"),
                         _entry("etc/pgvault-hostile", data=b"evil")],
    "relative symlink out": [_entry("up", tarfile.SYMTYPE, link="../"),
                             _entry("up/escaped", data=b"evil")],
    "symlink out, deep": [_entry("a", tarfile.DIRTYPE),
                          _entry("a/up", tarfile.SYMTYPE, link="../../escaped")],
    "hard link absolute": [_entry("passwd", tarfile.LNKTYPE, link="/etc/passwd")],
    "hard link out": [_entry("x", tarfile.LNKTYPE, link="../outside.txt")],
    "hard link through a symlink out": [_entry("up", tarfile.SYMTYPE, link=".."),
                                        _entry("x", tarfile.LNKTYPE, link="up/outside.txt")],
    "character device": [_entry("null", tarfile.CHRTYPE)],
    "block device": [_entry("disk", tarfile.BLKTYPE)],
    "fifo": [_entry("pipe", tarfile.FIFOTYPE)],
    # Every link inside when written, until a later member repoints the one it resolves
    # through: writing through it is refused, and so is the dangling result.
    "repointed link, written through": [
        _entry("d", tarfile.DIRTYPE), _entry("d/e", tarfile.DIRTYPE),
        _entry("b", tarfile.SYMTYPE, link="d/e"), _entry("a", tarfile.SYMTYPE, link="b/../.."),
        _entry("b", tarfile.SYMTYPE, link="."), _entry("a/escaped", data=b"evil")],
    "repointed link, left behind": [
        _entry("d", tarfile.DIRTYPE), _entry("d/e", tarfile.DIRTYPE),
        _entry("b", tarfile.SYMTYPE, link="d/e"), _entry("a", tarfile.SYMTYPE, link="b/../.."),
        _entry("b", tarfile.SYMTYPE, link=".")],
    # The folders found inside are remembered between members: a link repointed after that
    # must not let a later member through what those folders now resolve to.
    "repointed link, a folder member over it": [
        _entry("d", tarfile.DIRTYPE), _entry("d/e", tarfile.DIRTYPE),
        _entry("b", tarfile.SYMTYPE, link="d/e"), _entry("a", tarfile.SYMTYPE, link="b/../.."),
        _entry("b", tarfile.SYMTYPE, link="."), _entry("a", tarfile.DIRTYPE, mode=0o777)],
    "repointed link, written through a folder written into before": [
        _entry("d", tarfile.DIRTYPE), _entry("d/e", tarfile.DIRTYPE),
        _entry("b", tarfile.SYMTYPE, link="d/e"), _entry("a", tarfile.SYMTYPE, link="b/../.."),
        _entry("a/ok", data=b"fine"), _entry("b", tarfile.SYMTYPE, link="."),
        _entry("a/escaped", data=b"evil")],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_unpack_refuses_members_that_reach_outside_pgdata(case: str, tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (tmp_path / "outside.txt").write_bytes(b"keep")
    before = _files_outside(tmp_path)
    with pytest.raises(IntegrityError, match="refused"):
        unpack(_hostile(_entry("PG_VERSION", data=b"15\n"), *HOSTILE[case]), pgdata,
               owner=None)
    assert _files_outside(tmp_path) == before
    assert not (tmp_path.parent / "escaped").exists()  # "b/../.." from pgdata leads there
    assert (tmp_path / "outside.txt").read_bytes() == b"keep"
    assert not Path("/tmp/pgvault-hostile-abs").exists()
    assert not Path("/etc/pgvault-hostile").exists()
    links = [p for p in pgdata.rglob("*") if p.is_symlink()]
    assert all(p.resolve().is_relative_to(pgdata.resolve()) for p in links), links


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files to another user")
def test_unpack_gives_every_entry_the_owner_also_folders_the_tar_does_not_list(
        tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    owner = (54321, 54322)  # no such user: the ids are given as numbers
    unpack(_hostile(_entry("PG_VERSION", data=b"15\n"),
                    _entry("base/1/1259", data=b"x"),  # base and base/1 are not listed
                    _entry("global", tarfile.DIRTYPE),
                    _entry("global/alias", tarfile.SYMTYPE, link="../PG_VERSION"),
                    _entry("global/same", tarfile.LNKTYPE, link="PG_VERSION")),
           pgdata, owner=owner)
    entries = [pgdata, *pgdata.rglob("*")]
    assert len(entries) == 8
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in entries} == {owner}


def test_the_state_read_from_pg_control_agrees_with_pg_controldata(tmp_path: Path) -> None:
    """The restore's quick look at pg_control (the state field's offset and values) against
    pg_controldata, on a real cluster running and stopped."""
    from pgvault.ops.physical_restore import _control_says_production, _control_state
    from pgvault.pg.cluster import EphemeralCluster

    with EphemeralCluster() as cluster:
        assert _control_state(cluster) == "in production"
        assert _control_says_production(cluster)
        cluster._shutdown()  # stopped, its folder kept (stop() deletes it)
        assert _control_state(cluster) == "shut down"
        assert not _control_says_production(cluster)


def test_the_wal_prefetch_answers_absent_at_once_for_history_files_the_archive_lacks(
    tmp_path: Path
) -> None:
    """Promotion asks for the next timeline's history file and for the current one's (it
    copies its parent's): each one the archive lacks is answered "absent" by the spool, not
    by a wal-fetch process; one the archive holds is left to fetch."""
    import msgspec

    from pgvault.ops.physical_restore import _WalPrefetch

    stop = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    cases = [(1, [], ["00000001.history", "00000002.history"]),
             (2, ["00000002.history"], ["00000003.history"])]
    for timeline, histories, absent in cases:
        storage = MemoryStorage()
        segments = [wal.segment_name(timeline, segno, MB) for segno in (2, 3)]
        _archive(storage, histories + segments)
        facts = _physical("b1", 2, stop).physical
        assert facts is not None
        facts = msgspec.structs.replace(facts, timeline=timeline, start_wal=segments[0])
        pgdata = tmp_path / f"pgdata-{timeline}"
        pgdata.mkdir()
        with _WalPrefetch(storage, "main", facts, pgdata, None, None) as prefetch:
            answered = sorted(p.name for p in prefetch.folder.glob("*.absent"))
        assert answered == sorted(f"{name}.absent" for name in
                                  [*absent, wal.segment_name(timeline, 4, MB)])

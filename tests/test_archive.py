"""Data offsets of piped pg_dump archives: found as the stream goes by, equal to pg_dump's own."""

from __future__ import annotations

import io
import json
import random
import subprocess
from pathlib import Path

import psycopg
import pytest

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from fixtures_pg import MakeDb, NewName
from pgvault.engines.spool import Spool
from pgvault.errors import IntegrityError
from pgvault.pg.archive import OFFSET_SET, OffsetFinder, read_toc
from pgvault.pg.binaries import tool
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pipeline.compression import FrameSplit, ZstdEncoder

PG_DUMP = tool("pg_dump", 15)
PG_RESTORE = tool("pg_restore", 15)


def dump(url: str, *args: str) -> bytes:
    """pg_dump -Fc to a pipe: no data offsets in its table of contents."""
    return subprocess.run([PG_DUMP, "-Fc", *args, f"--dbname={url}"], check=True,
                          stdout=subprocess.PIPE).stdout


def recorded_offsets(archive: bytes) -> dict[int, int]:
    toc = read_toc(archive)
    return {e.dump_id: int.from_bytes(archive[e.offset_at + 1:e.offset_at + 1 + toc.off_size],
                                      "little")
            for e in toc.entries if archive[e.offset_at] == OFFSET_SET}


def find(archive: bytes, sizes: list[int]) -> OffsetFinder:
    finder = OffsetFinder()
    pos = 0
    for size in sizes:
        finder.feed(archive[pos:pos + size])
        pos += size
    finder.feed(archive[pos:])
    return finder


@pytest.fixture
def many_tables_db(make_db: MakeDb) -> str:
    """40 tables of 0 to 3,000 rows (some empty, some tiny), one index each, large objects."""
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(40):
            conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY, body text)")
            conn.execute(f"INSERT INTO t{i} SELECT g, repeat(md5(g::text), {i % 7 + 1}) "
                         f"FROM generate_series(1, {(i * 977) % 3001}) g")
        # Binary large objects holding what looks like block markers must not confuse the search.
        conn.execute("SELECT lo_from_bytea(0, decode(repeat('0000000000010000000000', 500), "
                     "'hex'))")
    return url


def test_offsets_match_what_pg_dump_writes_to_a_file(many_tables_db: str, tmp_path: Path) -> None:
    seekable = tmp_path / "file.dump"
    subprocess.run([PG_DUMP, "-Fc", "-Z0", f"--file={seekable}", f"--dbname={many_tables_db}"],
                   check=True)
    want = recorded_offsets(seekable.read_bytes())
    piped = dump(many_tables_db, "-Z0")
    assert recorded_offsets(piped) == {}  # pg_dump could not seek back on a pipe
    toc = read_toc(piped)
    blobs = [e.dump_id for e in toc.entries if e.desc == "BLOBS"]
    assert len(want) == 41 and len(blobs) == 1
    rng = random.Random(7)
    for sizes in ([1 << 20], [7] * 3000, [rng.randrange(1, 9000) for _ in range(400)]):
        finder = find(piped, sizes)
        assert finder.offsets == want, sizes[:3]


def test_a_patched_spool_restores_in_parallel(
    many_tables_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    piped = dump(many_tables_db, "-Z0")
    spool = tmp_path / "spool.dump"
    spool.write_bytes(piped)
    finder = find(piped, [65536] * (len(piped) // 65536))
    with spool.open("r+b") as f:
        assert finder.patch(f.fileno()) == 41
    assert recorded_offsets(spool.read_bytes()) == finder.offsets
    target = new_name()
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{target}"')
    subprocess.run([PG_RESTORE, "--exit-on-error", "-j", "3", f"--dbname={pg_cluster.url(target)}",
                    spool], check=True)
    assert_databases_equal(many_tables_db, pg_cluster.url(target))


@pytest.mark.parametrize("mangle", [
    pytest.param(lambda a: b"PGDMX" + a[5:], id="not-an-archive"),
    pytest.param(lambda a: a[:5] + bytes([1, 99]) + a[7:], id="unknown-version"),
    pytest.param(lambda a: a[:200], id="cut-inside-the-toc"),
])
def test_what_it_cannot_read_it_leaves_alone(mangle: object, many_tables_db: str,
                                             tmp_path: Path) -> None:
    archive = mangle(dump(many_tables_db, "-Z0"))  # type: ignore[operator]
    finder = find(archive, [100] * 50)
    assert finder.offsets == {}
    spool = tmp_path / "spool.dump"
    spool.write_bytes(archive)
    with spool.open("r+b") as f:
        assert finder.patch(f.fileno()) == 0
    assert spool.read_bytes() == archive


def test_compressed_archives_are_not_searched(many_tables_db: str) -> None:
    # pg_dump's own compression makes data blocks binary: the marker could occur by chance.
    archive = dump(many_tables_db, "-Z1")
    assert read_toc(archive).compressed
    assert find(archive, [1 << 16] * 10).offsets == {}


def test_parallel_restore_of_many_tables_whole_and_selected(
    many_tables_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    # Spooled with offsets, the schema created while spooling, then data and indexes with -j.
    repo = f"file://{tmp_path / 'repo'}"
    pgvault("backup", "--dbname", many_tables_db, "--repo", repo)
    whole = new_name()
    pgvault("restore", "latest", "--to", whole, "--dbname", pg_cluster.url(), "--repo", repo,
            "-j", "3")
    assert_databases_equal(many_tables_db, pg_cluster.url(whole))
    some = new_name()
    pgvault("restore", "latest", "--to", some, "--dbname", pg_cluster.url(), "--repo", repo,
            "-j", "2", "--table", "t7", "--table", "t39")
    with psycopg.connect(pg_cluster.url(some)) as conn:
        counts = dict(conn.execute(
            "SELECT relname, (xpath('/row/c/text()', query_to_xml("
            "format('SELECT count(*) AS c FROM %I', relname), false, true, '')))[1]::text::int "
            "FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
        ).fetchall())
    assert counts == {"t7": (7 * 977) % 3001, "t39": (39 * 977) % 3001}


def framed(archive: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
    """The archive as a framed backup stores it: zstd frames, and where each begins."""
    split = FrameSplit(OffsetFinder())
    blob = ZstdEncoder(io.BytesIO(archive), level=1, threads=2, split=split).read()
    return blob, [tuple(start) for start in split.starts]  # type: ignore[misc]


def test_a_framed_spool_is_the_archive_pg_dump_writes_to_a_file(
    many_tables_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    seekable = tmp_path / "file.dump"
    subprocess.run([PG_DUMP, "-Fc", "-Z0", f"--file={seekable}", f"--dbname={many_tables_db}"],
                   check=True)
    piped = dump(many_tables_db, "-Z0")
    blob, frames = framed(piped)
    assert len([f for f in frames if f[0]]) == 41  # each table's data and the large objects
    spool = Spool(io.BytesIO(blob), frames, len(piped))
    try:
        assert spool.wait_toc()
        path = Path(spool.wait())
        spooled = path.read_bytes()
        assert recorded_offsets(spooled) == recorded_offsets(seekable.read_bytes())
        toc_end = read_toc(piped).end
        assert spooled[toc_end:] == piped[toc_end:]
        target = new_name()
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{target}"')
        subprocess.run([PG_RESTORE, "--exit-on-error", "-j", "3",
                        f"--dbname={pg_cluster.url(target)}", path], check=True)
    finally:
        spool.close()
    assert not path.exists()
    assert_databases_equal(many_tables_db, pg_cluster.url(target))


@pytest.mark.parametrize("damage", ["frame-moved", "raw-offset-moved", "cut-at-a-frame",
                                    "bit-flipped"])
def test_a_framed_spool_refuses_what_does_not_add_up(damage: str, many_tables_db: str) -> None:
    piped = dump(many_tables_db, "-Z0")
    blob, frames = framed(piped)
    middle = len(frames) // 2
    name, offset, raw = frames[middle]
    if damage == "frame-moved":
        frames[middle] = (name, offset + 1, raw)
    elif damage == "raw-offset-moved":
        frames[middle] = (name, offset, raw - 1)
    elif damage == "cut-at-a-frame":
        blob = blob[:offset]
    else:
        flipped = bytearray(blob)
        flipped[offset + 100] ^= 0x04
        blob = bytes(flipped)
    spool = Spool(io.BytesIO(blob), frames, len(piped))
    try:
        with pytest.raises(IntegrityError, match=r"zstd|frame"):
            spool.wait()
    finally:
        spool.close()


def test_backups_are_framed_and_older_unframed_ones_still_restore_in_parallel(
    many_tables_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    repo = f"file://{tmp_path / 'repo'}"
    pgvault("backup", "--dbname", many_tables_db, "--repo", repo)
    (manifest,) = (tmp_path / "repo").glob("manifests/**/*.json")
    recorded = json.loads(manifest.read_text())
    dump_artifact = recorded["artifacts"][0]
    assert dump_artifact["name"] == "db.dump" and len(dump_artifact["frames"]) >= 41
    del dump_artifact["frames"]  # as written before frames existed
    manifest.write_text(json.dumps(recorded))
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
            "-j", "2")
    assert_databases_equal(many_tables_db, pg_cluster.url(target))

"""One store, one catalog, downward imports: the seams issue 18 cut, held by tests.

``store_artifact`` is the one place a stream is encoded, hashed and put (logical dumps,
base backups, WAL pushes); the WAL records are Catalog methods like every other key; and
no module imports one above it (the order of the design contract).
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from pgvault import pipeline
from pgvault.artifacts import store_artifact
from pgvault.catalog import Catalog, wal_failures_key, wal_identity_key, wal_object_key
from pgvault.errors import AlreadyExists, IntegrityError
from pgvault.model import Identity, PushFailures, StageSpec
from pgvault.pipeline.compression import FRAME_RAW_MAX
from pgvault.storage.memory import MemoryStorage

ZSTD = [StageSpec(name="zstd", level=1, threads=0)]
GZIP = [StageSpec(name="gzip", level=6)]
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class _Boundaries:
    """Names one fixed offset as a frame boundary (engines.spool's OffsetFinder finds them
    in pg_dump's archive; any stream will do here)."""

    def __init__(self, offsets: Mapping[int, int]) -> None:
        self._offsets = dict(offsets)

    @property
    def offsets(self) -> Mapping[int, int]:
        return self._offsets

    def feed(self, data: bytes) -> None:
        pass


class _Failing(io.RawIOBase):
    def __init__(self, good: bytes) -> None:
        self._good = io.BytesIO(good)

    def read(self, size: int = -1, /) -> bytes:
        data = self._good.read(size)
        if not data:
            raise OSError("the source died")
        return data


def _data(size: int) -> bytes:
    # Compressible but not trivially so: frames of real size.
    return b"".join(hashlib.sha256(str(i % 4099).encode()).digest() for i in
                    range(size // 32 + 1))[:size]


@pytest.mark.parametrize("stages", [[], ZSTD, GZIP], ids=["raw", "zstd", "gzip"])
def test_store_artifact_records_what_it_stored_and_it_decodes_back(
        stages: list[StageSpec]) -> None:
    storage = MemoryStorage()
    raw = _data(300_000)
    seen: list[int] = []
    written: list[str] = []
    key = "backups/app/1/db.dump" + pipeline.suffix(stages)
    artifact = store_artifact(storage, key, io.BytesIO(raw), stages, name="db.dump",
                              format="pg_dump-custom", progress=seen.append, written=written)
    stored = storage.read_bytes(key)
    assert written == [key]
    assert (artifact.key, artifact.name, artifact.format) == (key, "db.dump", "pg_dump-custom")
    assert artifact.size == len(stored) and artifact.sha256 == hashlib.sha256(stored).hexdigest()
    assert artifact.raw_size == len(raw) == sum(seen) and artifact.stages == stages
    assert artifact.frames == []
    assert pipeline.decode(io.BytesIO(stored), stages).read() == raw


def test_frames_are_recorded_only_when_zstd_is_the_first_stage() -> None:
    storage = MemoryStorage()
    raw = _data(FRAME_RAW_MAX + 300_000)
    framed = store_artifact(storage, "a.zst", io.BytesIO(raw), ZSTD, name="db.dump",
                            format="pg_dump-custom", boundaries=_Boundaries({7: 4096}))
    # The named boundary, then the size limit, each start a frame that decompresses alone.
    assert [(name, raw_at) for name, _, raw_at in framed.frames][:1] == [(7, 4096)]
    assert len(framed.frames) >= 2
    stored = storage.read_bytes("a.zst")
    for _, offset, raw_at in framed.frames:
        part = zstandard.ZstdDecompressor().decompressobj().decompress(stored[offset:])
        assert raw[raw_at:].startswith(part[:1000])
    plain = store_artifact(storage, "a.gz", io.BytesIO(raw), GZIP, name="db.dump",
                           format="pg_dump-custom", boundaries=_Boundaries({7: 4096}))
    assert plain.frames == []
    assert pipeline.decode(io.BytesIO(storage.read_bytes("a.gz")), GZIP).read() == raw


def test_a_failing_source_leaves_nothing_and_its_key_is_known_to_the_caller() -> None:
    storage = MemoryStorage()
    written: list[str] = []
    with pytest.raises(OSError, match="the source died"):
        store_artifact(storage, "backups/app/1/db.dump.zst", _Failing(_data(50_000)), ZSTD,
                       name="db.dump", format="pg_dump-custom", written=written)
    # Known before the put began: a run that fails later deletes what it may have left.
    assert written == ["backups/app/1/db.dump.zst"]
    assert list(storage.list("")) == []


def test_the_wal_identity_is_a_catalog_record_bound_once() -> None:
    catalog = Catalog(MemoryStorage())
    assert catalog.wal_identity("main") is None
    ours = Identity("7300000000000000001", 16 << 20)
    catalog.bind_wal_identity("main", ours, bound_at=NOW, host="db1")
    assert catalog.wal_identity("main") == ours
    with pytest.raises(AlreadyExists):
        catalog.bind_wal_identity("main", Identity("1", 16 << 20), bound_at=NOW, host="db2")
    assert catalog.wal_identity("main") == ours
    catalog.storage.put_bytes(wal_identity_key("other"), b'{"system_identifier": "1"}')
    with pytest.raises(IntegrityError, match=r"wal/other/identity.json is damaged"):
        catalog.wal_identity("other")


def test_push_failures_count_up_and_a_damaged_record_starts_afresh() -> None:
    catalog = Catalog(MemoryStorage())
    assert catalog.wal_push_failures("main") == PushFailures()
    catalog.record_wal_push_failure("main", "000000010000000000000001", "boom", NOW)
    catalog.record_wal_push_failure("main", "000000010000000000000002", "bang", NOW)
    assert catalog.wal_push_failures("main") == PushFailures(
        2, NOW, "000000010000000000000002", "bang")
    catalog.storage.put_bytes(wal_failures_key("main"), b"not json")
    assert catalog.wal_push_failures("main") == PushFailures()
    catalog.record_wal_push_failure("main", "000000010000000000000003", "again", NOW)
    assert catalog.wal_push_failures("main").total == 1


def test_the_wal_listing_is_every_archived_object_and_nothing_else() -> None:
    catalog = Catalog(MemoryStorage())
    digest = "ab" * 32
    keys = [wal_object_key("main", "000000010000000000000001", digest, ".zst"),
            wal_object_key("main", "000000010000000000000002", digest, ""),
            wal_object_key("main", "00000002.history", digest, ".zst.age")]
    for key in keys:
        catalog.storage.put_bytes(key, b"x")
    catalog.storage.put_bytes(wal_identity_key("main"), b"{}")
    catalog.storage.put_bytes(wal_failures_key("main"), b"{}")
    catalog.storage.put_bytes("wal/main/00000001/000000010000000000000003/short.zst", b"x")
    catalog.storage.put_bytes(wal_object_key("mainly", "000000010000000000000001", digest,
                                             ""), b"x")
    files = catalog.wal_files("main")
    assert sorted(f.key for f in files) == sorted(keys)
    assert {f.suffix for f in files} == {".zst", "", ".zst.age"}
    assert [f.wal.name for f in catalog.wal_versions("main", "000000010000000000000001")] \
        == ["000000010000000000000001"]


# The order of the design contract (docs/architecture.md), upper layers first. A module may
# import its own layer or a lower one, at module level or inside a function.
LAYERS: list[tuple[str, ...]] = [
    ("cli", "daemon", "web"),
    ("ops.fleet",),  # the shard loop: runs jobs, as the daemon does
    ("ops.jobs",),
    ("vault",),
    ("ops",),
    ("metrics", "sinks"),
    ("artifacts", "engines", "facts"),
    ("catalog",),
    ("lock", "lease", "fleet", "pipeline"),
    ("storage", "pg", "leftovers"),
    ("config", "retention", "schedule", "events", "console", "logs"),
    ("model", "health", "redact", "errors", "bytestream", "__init__"),
]
# Edges still pointing up, each with its owner's reason; the list may only shrink.
KNOWN_UPWARD = {
    # config.py hands out ConnInfo values, judges the repository URL with storage's parser
    # and checks [notify] event names against the events module while it reads them.
    ("config", "pg.conninfo"), ("config", "storage"), ("config", "events"),
}
SRC = Path(__file__).resolve().parent.parent / "src" / "pgvault"


def _layer(module: str) -> int:
    for number, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return number
    raise AssertionError(f"module {module!r} has no layer: add it to LAYERS")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pgvault":
                found |= {a.name for a in node.names if (SRC / f"{a.name}.py").exists()
                          or (SRC / a.name).is_dir()}
            elif node.module.startswith("pgvault."):
                module = node.module.removeprefix("pgvault.")
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names
                          if (SRC / module.replace(".", os.sep) / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pgvault.") for a in node.names
                      if a.name.startswith("pgvault.")}
    return found


def test_every_import_points_down() -> None:
    upward = set()
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for target in _imports(path):
            if _layer(target) < _layer(module):
                upward.add((module, target))
    assert upward <= KNOWN_UPWARD, sorted(upward - KNOWN_UPWARD)

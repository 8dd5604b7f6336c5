"""Storing one stream as an artifact: encoded through the stages, hashed, put, recorded.

Logical dumps, base backups and archived WAL files all go through ``store_artifact``, so a
stored object is encoded, hashed and made to appear the same way whatever wrote it. The key
comes from the caller (``catalog`` knows the layout); what it gets back is the ``Artifact``
record a manifest keeps, or a WAL push reports.
"""

from __future__ import annotations

from pgvault import pipeline
from pgvault.bytestream import Readable
from pgvault.model import Artifact, StageSpec
from pgvault.pipeline.compression import Boundaries, FrameSplit
from pgvault.pipeline.digest import HashingReader
from pgvault.pipeline.stream import CountingReader, Progress
from pgvault.storage.base import Storage


def store_artifact(
    storage: Storage,
    key: str,
    source: Readable,
    stages: list[StageSpec],
    *,
    name: str,
    format: str,
    progress: Progress | None = None,
    boundaries: Boundaries | None = None,
    written: list[str] | None = None,
) -> Artifact:
    """Encode ``source`` through ``stages`` and put it at ``key``; the record of what is stored.

    The key appears only once everything is stored (``Storage.put``): a failure leaves
    nothing under it and raises the source's or the storage's error unchanged.

    ``progress``: called with the size of each raw chunk read from ``source``.
    ``boundaries``: where a first zstd stage may end its frames (see engines.spool); the
    artifact then records where each frame begins, so a restore decompresses them apart.
    ``written``: the key is added before the put starts, so a run that fails later can
    delete whatever it may have stored.
    """
    raw = CountingReader(source, progress)
    split = (FrameSplit(boundaries) if boundaries is not None and stages
             and stages[0].name == "zstd" else None)
    stored = HashingReader(pipeline.encode(raw, stages, split=split))
    if written is not None:
        written.append(key)
    storage.put(key, stored)  # type: ignore[arg-type]
    return Artifact(name=name, key=key, size=stored.size, sha256=stored.sha256,
                    raw_size=raw.size, stages=stages, format=format,
                    frames=list(split.starts) if split else [])

"""Stream stages between engine and storage: encode on backup, decode on restore.

The stage list is recorded per artifact in the manifest, so restore reads the
manifest, never today's configuration, to know how to decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgvault.errors import ConfigError, IntegrityError
from pgvault.model import StageSpec
from pgvault.pipeline.compression import GzipDecoder, GzipEncoder, ZstdDecoder, ZstdEncoder
from pgvault.pipeline.stream import Readable

if TYPE_CHECKING:
    from pgvault.config import Settings

SUFFIXES = {"zstd": ".zst", "gzip": ".gz"}


def compression_spec(algorithm: str, level: int | None, threads: int) -> list[StageSpec]:
    """The stage list for a configured compression (an empty list for 'none')."""
    if algorithm == "none":
        return []
    if algorithm == "zstd":
        return [StageSpec(name="zstd", level=3 if level is None else level, threads=threads)]
    if algorithm == "gzip":
        return [StageSpec(name="gzip", level=6 if level is None else level)]
    raise ConfigError(f"unknown compression {algorithm!r} (choose zstd, gzip or none)")


def configured_stages(
    settings: Settings, algorithm: str | None = None, level: int | None = None
) -> list[StageSpec]:
    """The stage list a new artifact gets from the settings (flags may override compression)."""
    comp = settings.compression
    return compression_spec(algorithm or comp.algorithm,
                            comp.level if level is None else level, comp.threads)


def suffix(stages: list[StageSpec]) -> str:
    """The file-name suffix that tells stock tools how to decode, e.g. '.zst'."""
    return "".join(SUFFIXES.get(stage.name, "." + stage.name) for stage in stages)


def encode(source: Readable, stages: list[StageSpec]) -> Readable:
    """Wrap ``source`` in each stage's encoder, first stage innermost."""
    stream = source
    for stage in stages:
        if stage.name == "zstd":
            stream = ZstdEncoder(stream, level=stage.level or 3, threads=stage.threads or 0)
        elif stage.name == "gzip":
            stream = GzipEncoder(stream, level=stage.level or 6)
        else:
            raise ConfigError(f"unknown pipeline stage {stage.name!r}")
    return stream


def decode(source: Readable, stages: list[StageSpec]) -> Readable:
    """Undo ``encode``: apply each stage's decoder, last stage first."""
    stream = source
    for stage in reversed(stages):
        if stage.name == "zstd":
            stream = ZstdDecoder(stream)
        elif stage.name == "gzip":
            stream = GzipDecoder(stream)
        else:
            raise IntegrityError(f"artifact uses stage {stage.name!r}, which this pgvault lacks")
    return stream

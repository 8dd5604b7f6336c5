"""Stream stages between engine and storage: encode on backup, decode on restore.

The stage list is recorded per artifact in the manifest, so restore reads the
manifest, never today's configuration, to know how to decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgvault.errors import ConfigError, IntegrityError
from pgvault.model import StageSpec
from pgvault.pipeline.compression import (
    FrameSplit,
    GzipDecoder,
    GzipEncoder,
    ZstdDecoder,
    ZstdEncoder,
)
from pgvault.pipeline.stream import Readable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgvault.pipeline.age import Keyring

SUFFIXES = {"zstd": ".zst", "gzip": ".gz", "age": ".age"}
# Level 1: on a client with few CPUs, higher levels make the backup wait on compression
# for a modestly smaller output (docs/performance.md has the figures).
DEFAULT_LEVELS = {"zstd": 1, "gzip": 6}
"""The one place a compression's default level is decided; the --level help says it too."""
DEFAULT_ZSTD_LEVEL = DEFAULT_LEVELS["zstd"]


def compression_spec(algorithm: str, level: int | None, threads: int) -> list[StageSpec]:
    """The stage list for a configured compression (an empty list for 'none')."""
    if algorithm == "none":
        return []
    if algorithm not in DEFAULT_LEVELS:
        raise ConfigError(f"unknown compression {algorithm!r} (choose zstd, gzip or none)")
    explicit = DEFAULT_LEVELS[algorithm] if level is None else level
    if algorithm == "zstd":
        return [StageSpec(name="zstd", level=explicit, threads=threads)]
    return [StageSpec(name="gzip", level=explicit)]


def configured_stages(algorithm: str, level: int | None = None, threads: int = 0, *,
                      recipients: Sequence[str] = (), passphrase: bool = False,
                      ) -> list[StageSpec]:
    """The stage list a new artifact gets: compression first, then age when it has recipients.

    ``recipients`` are canonical (see ``age.canonical_recipient``), the passphrase-wrapped
    identity's among them in passphrase mode (``passphrase`` records that mode).
    """
    stages = compression_spec(algorithm, level, threads)
    if recipients:
        stages.append(StageSpec(name="age", recipients=tuple(dict.fromkeys(recipients)),
                                passphrase=True if passphrase else None))
    return stages


def suffix(stages: list[StageSpec]) -> str:
    """The file-name suffix that tells stock tools how to decode, e.g. '.zst'."""
    return "".join(SUFFIXES.get(stage.name, "." + stage.name) for stage in stages)


def encode(source: Readable, stages: list[StageSpec], *,
           split: FrameSplit | None = None) -> Readable:
    """Wrap ``source`` in each stage's encoder, first stage innermost.

    ``split``: where a zstd stage ends frames, and where it records them (see ZstdEncoder).
    """
    stream = source
    for stage in stages:
        if stage.name == "zstd":
            stream = ZstdEncoder(stream, level=_level(stage), threads=stage.threads or 0,
                                 split=split)
        elif stage.name == "gzip":
            stream = GzipEncoder(stream, level=_level(stage))
        elif stage.name == "age":
            from pgvault.pipeline.age import AgeEncoder

            stream = AgeEncoder(stream, stage.recipients or ())
        else:
            raise ConfigError(f"unknown pipeline stage {stage.name!r}")
    return stream


def _level(stage: StageSpec) -> int:
    return DEFAULT_LEVELS[stage.name] if stage.level is None else stage.level


def decode(source: Readable, stages: list[StageSpec], *, identities: Keyring | None = None,
           what: str = "the artifact") -> Readable:
    """Undo ``encode``: apply each stage's decoder, last stage first.

    An age stage needs ``identities``; without a matching one it raises DecryptionError
    (naming ``what`` and the recipients) before reading past the age header.
    """
    stream = source
    for stage in reversed(stages):
        if stage.name == "zstd":
            stream = ZstdDecoder(stream)
        elif stage.name == "gzip":
            stream = GzipDecoder(stream)
        elif stage.name == "age":
            from pgvault.pipeline.age import decoder

            stream = decoder(stream, stage, identities, what)
        else:
            raise IntegrityError(f"artifact uses stage {stage.name!r}, which this pgvault lacks")
    return stream


def seal_value(data: bytes, stage: StageSpec) -> str:
    """A small secret encrypted by one age stage, as base64 text for a manifest."""
    import base64
    import io

    return base64.b64encode(_read_all(encode(io.BytesIO(data), [stage]))).decode()


def open_sealed(text: str, stage: StageSpec, identities: Keyring | None, what: str) -> bytes:
    """Undo ``seal_value`` with the identities that open the backup itself."""
    import base64
    import io

    reader = decode(io.BytesIO(base64.b64decode(text)), [stage], identities=identities,
                    what=what)
    return _read_all(reader)


def _read_all(reader: Readable) -> bytes:
    return b"".join(iter(lambda: reader.read(1 << 16), b""))


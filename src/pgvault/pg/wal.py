"""WAL arithmetic as PostgreSQL does it: LSNs, WAL file names, segment and control headers."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pgvault.errors import UsageError

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_WAL_NAME = re.compile(
    r"^(?P<tli>[0-9A-F]{8})(?:(?P<log>[0-9A-F]{8})(?P<seg>[0-9A-F]{8})"
    r"(?P<suffix>\.partial|\.[0-9A-F]{8}\.backup)?|(?P<history>\.history))$"
)
_XLP_LONG_HEADER = 0x0002
_LOG_SPAN = 0x1_0000_0000  # bytes of WAL per "log" (the middle 8 hex digits of a name)


def parse_lsn(text: str) -> int:
    """'16/B374D848' as an integer byte position; UsageError for anything else."""
    match = _LSN.match(text.strip())
    if match is None:
        raise UsageError(f"{text!r} is not an LSN (expected e.g. 0/3000028)")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass(frozen=True, order=True)
class WalName:
    """One file PostgreSQL archives: a segment, a .partial, a .backup label or a .history."""

    timeline: int
    log: int
    seg: int
    kind: str  # "segment", "partial", "backup", "history"
    name: str

    def segno(self, segment_size: int) -> int:
        """The segment's position in the WAL stream, whatever its timeline."""
        return self.log * (_LOG_SPAN // segment_size) + self.seg

    @property
    def has_header(self) -> bool:
        """Whether the file starts with a WAL page header (history and .backup files are text)."""
        return self.kind in ("segment", "partial")


def parse_wal_name(name: str) -> WalName | None:
    """The parts of a WAL file name; None for names PostgreSQL never archives."""
    match = _WAL_NAME.match(name)
    if match is None:
        return None
    timeline = int(match["tli"], 16)
    if match["history"]:
        return WalName(timeline, 0, 0, "history", name)
    suffix = match["suffix"] or ""
    kind = "partial" if suffix == ".partial" else "backup" if suffix else "segment"
    return WalName(timeline, int(match["log"], 16), int(match["seg"], 16), kind, name)


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    """The file name of segment ``segno`` on ``timeline`` (XLogFileName)."""
    per_log = _LOG_SPAN // segment_size
    return f"{timeline:08X}{segno // per_log:08X}{segno % per_log:08X}"


def segment_of(lsn: int, segment_size: int) -> int:
    """The segment holding the byte at ``lsn`` (XLByteToSeg)."""
    return lsn // segment_size


def last_segment_of(end_lsn: int, segment_size: int) -> int:
    """The segment holding the last byte before ``end_lsn`` (XLByteToPrevSeg)."""
    return (end_lsn - 1) // segment_size


@dataclass(frozen=True)
class SegmentHeader:
    """The long page header at the start of every WAL segment."""

    system_identifier: int
    segment_size: int
    block_size: int
    page_address: int


def read_segment_header(data: bytes) -> SegmentHeader | None:
    """Parse XLogLongPageHeaderData; None if ``data`` does not start with one."""
    if len(data) < 40:
        return None
    _magic, info, _tli, page_address, _rem = struct.unpack_from("<HHIQI", data, 0)
    if not info & _XLP_LONG_HEADER:
        return None
    # The standard header is 20 bytes, MAXALIGNed to 24 before the 8-byte system identifier.
    system_identifier, segment_size, block_size = struct.unpack_from("<QII", data, 24)
    plausible = (
        segment_size & (segment_size - 1) == 0
        and (1 << 20) <= segment_size <= (1 << 30)
        and block_size in (1024, 2048, 4096, 8192, 16384, 32768)
    )
    if not plausible:
        return None
    return SegmentHeader(system_identifier, segment_size, block_size, page_address)


def control_system_identifier(pg_control: bytes) -> int:
    """The system identifier: the first field of global/pg_control (ControlFileData)."""
    if len(pg_control) < 8:
        raise ValueError("global/pg_control is too short")
    value: int = struct.unpack_from("<Q", pg_control, 0)[0]
    return value


def parse_backup_label(text: str) -> dict[str, str]:
    """'KEY: value' lines of a backup_label (START WAL LOCATION, START TIMELINE, ...)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields

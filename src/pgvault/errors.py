"""The error tree: every failure pgvault reports maps to one exit code and one line."""

from __future__ import annotations


class PgvaultError(Exception):
    """Base of every error pgvault reports as one line and a non-zero exit."""

    exit_code = 1


class UsageError(PgvaultError):
    """The command line asks for something impossible."""

    exit_code = 2


class ConfigError(PgvaultError):
    """The configuration file or environment is invalid."""

    exit_code = 3


class DatabaseError(PgvaultError):
    """PostgreSQL could not be reached, refused us, or a client tool failed."""

    exit_code = 4


class StorageError(PgvaultError):
    """The repository could not be read or written."""

    exit_code = 5


class TransientStorageError(StorageError):
    """A storage failure that may succeed when retried (timeouts, throttling, 5xx)."""


class NotFound(StorageError):
    """A key, backup or artifact does not exist."""


class AlreadyExists(StorageError):
    """A create-if-absent write found the key already there."""


class Conflict(StorageError):
    """A conditional write (``replace_if``) found the object not at the version it expected."""


class IntegrityError(PgvaultError):
    """Stored bytes do not match what the manifest recorded."""

    exit_code = 6


class LockHeld(PgvaultError):
    """Another pgvault process holds the repository lock for this database."""

    exit_code = 7


class BackupFailed(PgvaultError):
    """pg_dump, pg_dumpall or another backup step failed."""

    exit_code = 8


class RestoreFailed(PgvaultError):
    """pg_restore or another restore step failed."""

    exit_code = 9


class VerifyFailed(PgvaultError):
    """A restore drill ran, and a check other than integrity failed (restore, facts, ...)."""

    exit_code = 10


class DecryptionError(PgvaultError):
    """An encrypted backup cannot be opened: no identity, or none of them is a recipient."""

    exit_code = 11


class Interrupted(PgvaultError):
    """Interrupted by Ctrl-C (SIGINT), after the cleanup (uploads aborted, lock released)."""

    exit_code = 130


class StatusCritical(PgvaultError):
    """`pgvault status` showed a database CRITICAL: an objective missed, or a drill failed."""

    exit_code = 12


class RecordFailed(PgvaultError):
    """The verdict stands (it is printed first), but the repository refused to store its record."""

    exit_code = 13


class Terminated(Interrupted):
    """Stopped by SIGTERM, after the same cleanup as for Ctrl-C."""

    exit_code = 143


class SnapshotFailed(PgvaultError):
    """A provider snapshot (RDS, Aurora) was refused, failed, or did not finish in time."""

    exit_code = 14

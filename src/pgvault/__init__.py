"""pgvault: PostgreSQL backups that are proven to restore."""

__version__ = "0.1.0"

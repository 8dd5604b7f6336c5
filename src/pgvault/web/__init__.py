"""The web console: every database's objectives, backups and drills, read-only.

``views`` turns what the repository says (``ops.jobs.status_of``, the catalog, a dry-run
prune plan) into plain rows; ``app`` serves them as server-rendered pages behind the token
check and the security headers; the templates and the one style sheet are package data.
The daemon mounts it on its HTTP server; ``pgvault console`` serves it alone.
"""

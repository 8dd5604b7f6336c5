"""Where restore drills restore: a configured server, or ephemeral clusters started on demand.

A drill restores into a scratch database (ops/verify.py) on the server a ``ScratchServers``
hands it for the backup's PostgreSQL major; ephemeral clusters die with this process
unless kept (pg/cluster.py), and the next run sweeps what a killed one left (leftovers.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pgvault.errors import DatabaseError
from pgvault.pg.conninfo import ConnInfo


@dataclass
class Place:
    """A server drills restore onto: its admin connection and how to describe it."""

    conn: ConnInfo
    where: str
    ephemeral: bool
    cluster: Any = None


class ScratchServers:
    """Where drills restore: a configured server, or ephemeral clusters started on demand.

    One ephemeral cluster per PostgreSQL major (the backup's own), shared by the drills
    of one run and stopped by ``close()``; with ``keep`` they are left running instead.
    """

    def __init__(self, server: ConnInfo | None = None, *, keep: bool = False,
                 base_dir: str | None = None) -> None:
        self.server = server
        self.keep = keep
        self.base_dir = base_dir
        self.kept: list[str] = []
        """How to reach and remove what ``keep`` left behind, one line each."""
        self._clusters: dict[int, Place] = {}

    def place(self, major: int) -> Place:
        """The server to restore a backup of PostgreSQL ``major`` onto."""
        if self.server is not None:
            return Place(self.server, f"server {self.server.redacted()}", ephemeral=False)
        if major not in self._clusters:
            from pgvault.pg.cluster import EphemeralCluster

            try:
                cluster = EphemeralCluster(major=major, base_dir=self.base_dir,
                                           dies_with_owner=not self.keep).start()
            except DatabaseError as exc:
                raise DatabaseError(
                    f"cannot start a PostgreSQL {major} cluster for the drill: {exc}; "
                    "or verify on a server with --server URL ([verify] server)"
                ) from None
            self._clusters[major] = Place(
                ConnInfo.parse(cluster.url()), f"ephemeral PostgreSQL {cluster.major} cluster",
                ephemeral=True, cluster=cluster,
            )
        return self._clusters[major]

    def close(self, *, interrupted: bool = False) -> None:
        """Stop the ephemeral clusters (or, with keep, say how to stop them)."""
        clusters, self._clusters = self._clusters, {}
        for place in clusters.values():
            cluster = place.cluster
            if self.keep and not interrupted:
                cluster.detach()
                stop = f"{cluster.bindir / 'pg_ctl'} -D {cluster.data_dir} stop"
                if os.geteuid() == 0:  # the cluster runs as the postgres OS user
                    stop = f"su postgres -s /bin/sh -c '{stop}'"
                self.kept.append(f"cluster kept running: stop it with: {stop} && "
                                 f"rm -rf {cluster.root}")
            else:
                cluster.stop()

    def __enter__(self) -> ScratchServers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close(interrupted=exc_type is not None)

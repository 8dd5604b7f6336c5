"""A real RDS API over HTTP on loopback: moto's server mode in a child process of its own.

Its own process (not the S3 tests' one): the quota is counted per region over every
manual snapshot, so each test also gets a region of its own (``rds_region``) and sees only
the snapshots it made. moto creates instances, clusters and snapshots "available" at once,
and a restored instance's endpoint is fake: nothing here connects to a database.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from fixtures_s3 import _AWS_ENV, _AWS_UNSET, moto_server

_REGIONS = itertools.cycle([
    "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-west-2", "eu-west-3",
    "eu-central-1", "eu-north-1", "ap-southeast-1", "ap-southeast-2", "ap-northeast-1",
    "ap-south-1", "ca-central-1", "sa-east-1", "ap-northeast-2", "us-east-1",
])


@pytest.fixture(scope="session")
def rds_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto server on 127.0.0.1 for RDS, with dummy AWS credentials set."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in _AWS_UNSET:
            mp.delenv(name, raising=False)
        empty: Path = tmp_path_factory.mktemp("aws-rds")
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        with moto_server(empty / "moto.log") as url:
            yield url


@dataclass(frozen=True)
class RdsSource:
    """A DB instance (rds) or DB cluster (aurora) in a region no other test uses."""

    kind: str
    source_id: str
    region: str
    endpoint_url: str
    client: Any

    def toml(self, header: str = "[snapshot]", **extra: object) -> str:
        """The [snapshot] section of a config file for it."""
        key = "instance" if self.kind == "rds" else "cluster"
        values: dict[str, object] = {"provider": self.kind, key: self.source_id,
                                     "region": self.region, "endpoint_url": self.endpoint_url,
                                     "poll_seconds": 0.05, **extra}
        lines = [header] + [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}"
                                  for k, v in values.items()]
        return "\n".join(lines) + "\n"

    def snapshots(self) -> list[dict[str, Any]]:
        """Every manual snapshot of this kind in the region, with its tags."""
        if self.kind == "rds":
            found: list[dict[str, Any]] = self.client.describe_db_snapshots(
                SnapshotType="manual")["DBSnapshots"]
        else:
            found = self.client.describe_db_cluster_snapshots(
                SnapshotType="manual")["DBClusterSnapshots"]
        return found

    def foreign_snapshot(self, name: str, tags: dict[str, str] | None = None) -> None:
        """A manual snapshot pgvault did not create (by hand, AWS Backup, another tool)."""
        tag_list = [{"Key": k, "Value": v} for k, v in (tags or {}).items()]
        if self.kind == "rds":
            self.client.create_db_snapshot(DBSnapshotIdentifier=name,
                                           DBInstanceIdentifier=self.source_id, Tags=tag_list)
        else:
            self.client.create_db_cluster_snapshot(DBClusterSnapshotIdentifier=name,
                                                   DBClusterIdentifier=self.source_id,
                                                   Tags=tag_list)


def make_source(endpoint_url: str, kind: str, retention_days: int = 7) -> RdsSource:
    region = next(_REGIONS)
    client = botocore.session.get_session().create_client(
        "rds", region_name=region, endpoint_url=endpoint_url)
    source_id = f"{'app' if kind == 'rds' else 'aur'}-{uuid.uuid4().hex[:8]}"
    if kind == "rds":
        client.create_db_instance(
            DBInstanceIdentifier=source_id, DBInstanceClass="db.t3.micro", Engine="postgres",
            EngineVersion="15.4", MasterUsername="app", MasterUserPassword="not-a-secret-1",
            AllocatedStorage=20, BackupRetentionPeriod=retention_days)
    else:
        client.create_db_cluster(
            DBClusterIdentifier=source_id, Engine="aurora-postgresql", EngineVersion="15.4",
            MasterUsername="app", MasterUserPassword="not-a-secret-1",
            BackupRetentionPeriod=retention_days)
    return RdsSource(kind, source_id, region, endpoint_url, client)


MakeSource = Callable[..., RdsSource]


@pytest.fixture
def make_rds_source(rds_server: str) -> MakeSource:
    """Factory ``make_rds_source(kind, retention_days=7)`` of fresh sources."""
    return functools.partial(make_source, rds_server)


@pytest.fixture(params=["rds", "aurora"])
def rds_source(request: pytest.FixtureRequest, rds_server: str) -> RdsSource:
    """A fresh RDS instance or Aurora cluster (both kinds), automated backups kept 7 days."""
    return make_source(rds_server, request.param)


@pytest.fixture
def rds_instance(rds_server: str) -> RdsSource:
    """A fresh RDS instance in a region of its own."""
    return make_source(rds_server, "rds")

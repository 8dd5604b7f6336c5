"""A real RDS API over HTTP on loopback: moto's server mode in a child process of its own.

Its own process (not the S3 tests' one): the quota is counted per region over every
manual snapshot, so each test also gets a region of its own (``rds_region``) and sees only
the snapshots it made. moto creates instances, clusters and snapshots "available" at once,
and a restored instance's endpoint is fake: nothing here connects to a database (a drill's
checks are pointed at a local PostgreSQL through ``drill_connect_override``, the test-only
seam of [snapshot]). One moto server serves every region on one endpoint, so cross-region
copies (and the destination's KMS keys) run against it too.
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
    "ap-northeast-3", "eu-south-1", "ap-east-1", "me-south-1", "af-south-1", "il-central-1",
    "ap-southeast-3", "eu-central-2", "eu-south-2", "ap-south-2", "me-central-1",
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
        lines = [header] + [f'{k} = "{v}"' if isinstance(v, str) else
                            f"{k} = {str(v).lower()}" if isinstance(v, bool) else f"{k} = {v!r}"
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

    def drills(self) -> list[dict[str, Any]]:
        """The instances (rds) or clusters (aurora) of the region tagged as pgvault drills."""
        if self.kind == "rds":
            items: list[dict[str, Any]] = self.client.describe_db_instances()["DBInstances"]
        else:
            items = self.client.describe_db_clusters()["DBClusters"]
        return [i for i in items if any(t["Key"] == "pgvault:drill"
                                        for t in i.get("TagList", []))]

    def instances(self) -> list[str]:
        """Every DB instance identifier of the region."""
        return [i["DBInstanceIdentifier"]
                for i in self.client.describe_db_instances()["DBInstances"]]

    def network(self) -> tuple[str, str]:
        """A VPC with two subnets, a DB subnet group and a security group for drills."""
        session = botocore.session.get_session()
        ec2 = session.create_client("ec2", region_name=self.region,
                                    endpoint_url=self.endpoint_url)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        zones = [z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]]
        subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24",
                                     AvailabilityZone=zone)["Subnet"]["SubnetId"]
                   for i, zone in enumerate(zones[:2], 1)]
        group = ec2.create_security_group(GroupName="pgvault-drills", Description="drills",
                                          VpcId=vpc)["GroupId"]
        name = f"drills-{uuid.uuid4().hex[:6]}"
        self.client.create_db_subnet_group(DBSubnetGroupName=name, SubnetIds=subnets,
                                           DBSubnetGroupDescription="pgvault drills")
        return name, str(group)

    def other_region(self) -> tuple[str, Any, str]:
        """Another region no test uses: (region, its RDS client, a KMS key ARN there)."""
        region = next(_REGIONS)
        session = botocore.session.get_session()
        client = session.create_client("rds", region_name=region,
                                       endpoint_url=self.endpoint_url)
        kms = session.create_client("kms", region_name=region, endpoint_url=self.endpoint_url)
        return region, client, str(kms.create_key()["KeyMetadata"]["Arn"])

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

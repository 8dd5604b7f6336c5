"""RDS and Aurora snapshots through the RDS API (botocore).

``kind`` "rds": DB snapshots of a DB instance (CreateDBSnapshot, DescribeDBSnapshots,
DeleteDBSnapshot, DescribeDBInstances). "aurora": DB cluster snapshots of a DB cluster
(CreateDBClusterSnapshot, DescribeDBClusterSnapshots, DeleteDBClusterSnapshot,
DescribeDBClusters). Copies into this provider's region: CopyDBSnapshot /
CopyDBClusterSnapshot with the destination's KMS key. Drills: RestoreDBInstanceFromDBSnapshot
(Aurora: RestoreDBClusterFromSnapshot, then CreateDBInstance in it, since a restored cluster
has no instance to connect to), DescribeDBInstances / DescribeDBClusters, DeleteDBInstance /
DeleteDBCluster without a final snapshot. Credentials come from botocore's standard chain
(AWS_* variables, profiles, instance roles), or the key pair the AWS_*_FILE variables hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from pgvault.engines.snapshots import (
    IN_PROGRESS,
    TAG_DRILL,
    DrillInstance,
    DrillPlacement,
    ProviderSnapshot,
)
from pgvault.errors import SnapshotFailed
from pgvault.health import AutomatedBackups

_NOT_FOUND = ("DBSnapshotNotFound", "DBClusterSnapshotNotFoundFault", "DBSnapshotNotFoundFault",
              "DBClusterSnapshotNotFound", "DBInstanceNotFound", "DBInstanceNotFoundFault",
              "DBClusterNotFoundFault", "DBClusterNotFound")
DRILL_CLASS = {"rds": "db.t3.micro", "aurora": "db.t4g.medium"}
"""The smallest instance class each accepts: a drill only needs to answer queries."""


class RdsProvider:
    """Snapshots of one RDS instance or Aurora cluster in one region."""

    def __init__(self, kind: str, source_id: str, *, region: str | None = None,
                 endpoint_url: str | None = None,
                 credentials: tuple[str, str, str | None] | None = None,
                 timeout: float = 60.0) -> None:
        # botocore alone, imported here: only snapshot commands pay for it.
        import botocore.session
        from botocore.config import Config

        if kind not in ("rds", "aurora"):
            raise ValueError(f"unknown RDS snapshot kind {kind!r}")
        self._kind = kind
        self._source_id = source_id
        session = botocore.session.get_session()
        extra: dict[str, Any] = {}
        if credentials is not None:
            extra = {"aws_access_key_id": credentials[0],
                     "aws_secret_access_key": credentials[1],
                     "aws_session_token": credentials[2]}
        try:
            self._client: Any = session.create_client(
                "rds", region_name=region, endpoint_url=endpoint_url,
                config=Config(connect_timeout=timeout, read_timeout=timeout,
                              retries={"mode": "standard", "max_attempts": 5}),
                **extra)
        except Exception as exc:  # NoRegionError, a malformed endpoint...
            raise SnapshotFailed(f"{kind} {source_id}: {exc}") from None
        self._region: str = self._client.meta.region_name or ""

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def region(self) -> str:
        return self._region

    @property
    def source_id(self) -> str:
        return self._source_id

    def __repr__(self) -> str:
        return f"RdsProvider({self._kind}, {self._source_id}, {self._region})"

    # -- calls ----------------------------------------------------------------------------

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One API call; a refusal is a SnapshotFailed naming the operation and AWS's code."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result: dict[str, Any] = getattr(self._client, operation)(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            if code in _NOT_FOUND:
                raise _Gone(code) from None
            raise SnapshotFailed(f"{self._kind} {self._source_id} ({self._region}): {operation} "
                                 f"refused: {code}: {error.get('Message', '')}".rstrip(": ")
                                 ) from None
        except BotoCoreError as exc:
            raise SnapshotFailed(f"{self._kind} {self._source_id} ({self._region}): "
                                 f"{operation} failed: {exc}") from None
        return result

    def _pages(self, operation: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        marker: str | None = None
        while True:
            page = self._call(operation, **params, **({"Marker": marker} if marker else {}))
            yield from page.get(key, [])
            marker = page.get("Marker")
            if not marker:
                return

    def create(self, snapshot_id: str, tags: Mapping[str, str]) -> ProviderSnapshot:
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        if self._kind == "rds":
            found = self._call("create_db_snapshot", DBSnapshotIdentifier=snapshot_id,
                               DBInstanceIdentifier=self._source_id, Tags=tag_list)
            return self._snapshot(found["DBSnapshot"])
        found = self._call("create_db_cluster_snapshot", DBClusterSnapshotIdentifier=snapshot_id,
                           DBClusterIdentifier=self._source_id, Tags=tag_list)
        return self._snapshot(found["DBClusterSnapshot"])

    def describe(self, snapshot_id: str) -> ProviderSnapshot | None:
        try:
            if self._kind == "rds":
                items = self._call("describe_db_snapshots",
                                   DBSnapshotIdentifier=snapshot_id)["DBSnapshots"]
            else:
                items = self._call("describe_db_cluster_snapshots",
                                   DBClusterSnapshotIdentifier=snapshot_id
                                   )["DBClusterSnapshots"]
        except _Gone:
            return None
        return self._snapshot(items[0]) if items else None

    def _manual(self, **params: Any) -> Iterator[dict[str, Any]]:
        if self._kind == "rds":
            return self._pages("describe_db_snapshots", "DBSnapshots", SnapshotType="manual",
                               **params)
        return self._pages("describe_db_cluster_snapshots", "DBClusterSnapshots",
                           SnapshotType="manual", **params)

    def list_ours(self, database: str) -> list[ProviderSnapshot]:
        source = ({"DBInstanceIdentifier": self._source_id} if self._kind == "rds"
                  else {"DBClusterIdentifier": self._source_id})
        found = [self._snapshot(item) for item in self._manual(**source)]
        return [s for s in found if s.source_id == self._source_id and s.ours(database)]

    def count_manual(self) -> int:
        return sum(1 for _ in self._manual())

    def delete(self, snapshot_id: str) -> bool:
        try:
            if self._kind == "rds":
                self._call("delete_db_snapshot", DBSnapshotIdentifier=snapshot_id)
            else:
                self._call("delete_db_cluster_snapshot", DBClusterSnapshotIdentifier=snapshot_id)
        except _Gone:
            return False
        return True

    def automated_backups(self, expected_retention_days: int) -> AutomatedBackups:
        try:
            if self._kind == "rds":
                items = self._call("describe_db_instances",
                                   DBInstanceIdentifier=self._source_id)["DBInstances"]
                status_key = "DBInstanceStatus"
            else:
                items = self._call("describe_db_clusters",
                                   DBClusterIdentifier=self._source_id)["DBClusters"]
                status_key = "Status"
        except (SnapshotFailed, _Gone) as exc:
            return AutomatedBackups(self._kind, self._source_id,
                                    expected_retention_days=expected_retention_days,
                                    error=str(exc))
        if not items:
            return AutomatedBackups(self._kind, self._source_id,
                                    expected_retention_days=expected_retention_days,
                                    error="not found")
        item = items[0]
        latest = item.get("LatestRestorableTime")
        return AutomatedBackups(
            self._kind, self._source_id, status=str(item.get(status_key, "")),
            retention_days=int(item.get("BackupRetentionPeriod") or 0),
            latest_restorable=latest if isinstance(latest, datetime) else None,
            expected_retention_days=expected_retention_days)

    def in_progress(self) -> int:
        return sum(1 for item in self._manual() if item.get("Status") in IN_PROGRESS)

    def copy_from(self, source: ProviderSnapshot, snapshot_id: str, tags: Mapping[str, str],
                  kms_key_id: str | None) -> ProviderSnapshot:
        # The source is named by its ARN; SourceRegion lets botocore sign the presigned URL
        # AWS needs for an encrypted cross-region copy.
        source_region = source.arn.split(":")[3] if source.arn.count(":") >= 5 else None
        params: dict[str, Any] = {
            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            **({"KmsKeyId": kms_key_id} if kms_key_id else {}),
            **({"SourceRegion": source_region} if source_region else {})}
        if self._kind == "rds":
            found = self._call("copy_db_snapshot", SourceDBSnapshotIdentifier=source.arn,
                               TargetDBSnapshotIdentifier=snapshot_id, **params)
            return self._snapshot(found["DBSnapshot"])
        found = self._call("copy_db_cluster_snapshot",
                           SourceDBClusterSnapshotIdentifier=source.arn,
                           TargetDBClusterSnapshotIdentifier=snapshot_id, **params)
        return self._snapshot(found["DBClusterSnapshot"])

    def restore_drill(self, snapshot_id: str, name: str, tags: Mapping[str, str],
                      placement: DrillPlacement) -> None:
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        network: dict[str, Any] = {
            **({"DBSubnetGroupName": placement.subnet_group} if placement.subnet_group else {}),
            **({"VpcSecurityGroupIds": list(placement.security_groups)}
               if placement.security_groups else {})}
        instance_class = placement.instance_class or DRILL_CLASS[self._kind]
        if self._kind == "rds":
            self._call("restore_db_instance_from_db_snapshot", DBInstanceIdentifier=name,
                       DBSnapshotIdentifier=snapshot_id, DBInstanceClass=instance_class,
                       PubliclyAccessible=False, MultiAZ=False, DeletionProtection=False,
                       Tags=tag_list, **network)
            return
        engine = self._call("describe_db_cluster_snapshots",
                            DBClusterSnapshotIdentifier=snapshot_id
                            )["DBClusterSnapshots"][0].get("Engine", "aurora-postgresql")
        self._call("restore_db_cluster_from_snapshot", DBClusterIdentifier=name,
                   SnapshotIdentifier=snapshot_id, Engine=engine, DeletionProtection=False,
                   Tags=tag_list, **network)
        self._call("create_db_instance", DBInstanceIdentifier=f"{name}-1",
                   DBClusterIdentifier=name, DBInstanceClass=instance_class, Engine=engine,
                   PubliclyAccessible=False, Tags=tag_list)

    def describe_drill(self, name: str) -> DrillInstance | None:
        try:
            if self._kind == "rds":
                items = self._call("describe_db_instances",
                                   DBInstanceIdentifier=name)["DBInstances"]
                if not items:
                    return None
                item = items[0]
                endpoint = item.get("Endpoint") or {}
                return DrillInstance(name, str(item.get("DBInstanceStatus", "")),
                                     endpoint.get("Address"), endpoint.get("Port"),
                                     _tags(item))
            clusters = self._call("describe_db_clusters", DBClusterIdentifier=name)["DBClusters"]
            if not clusters:
                return None
            cluster = clusters[0]
            status = str(cluster.get("Status", ""))
            try:
                members = self._call("describe_db_instances", DBInstanceIdentifier=f"{name}-1"
                                     )["DBInstances"]
            except _Gone:
                members = []
            # Queryable once the cluster and its one instance both are.
            member = str(members[0].get("DBInstanceStatus", "")) if members else "missing"
            if status == "available" and member != "available":
                status = f"instance {member}"
            return DrillInstance(name, status, cluster.get("Endpoint"), cluster.get("Port"),
                                 _tags(cluster))
        except _Gone:
            return None

    def list_drills(self) -> list[DrillInstance]:
        if self._kind == "rds":
            items = self._pages("describe_db_instances", "DBInstances")
            return [DrillInstance(str(i["DBInstanceIdentifier"]),
                                  str(i.get("DBInstanceStatus", "")), tags=_tags(i))
                    for i in items if TAG_DRILL in _tags(i)]
        clusters = self._pages("describe_db_clusters", "DBClusters")
        return [DrillInstance(str(c["DBClusterIdentifier"]), str(c.get("Status", "")),
                              tags=_tags(c)) for c in clusters if TAG_DRILL in _tags(c)]

    def delete_drill(self, name: str) -> bool:
        if self._kind == "rds":
            try:
                self._call("delete_db_instance", DBInstanceIdentifier=name,
                           SkipFinalSnapshot=True, DeleteAutomatedBackups=True)
            except _Gone:
                return False
            return True
        # The instance first: a cluster with an instance not being deleted refuses.
        with contextlib.suppress(_Gone):
            self._call("delete_db_instance", DBInstanceIdentifier=f"{name}-1",
                       SkipFinalSnapshot=True)
        try:
            self._call("delete_db_cluster", DBClusterIdentifier=name, SkipFinalSnapshot=True)
        except _Gone:
            return False
        return True

    def _snapshot(self, item: Mapping[str, Any]) -> ProviderSnapshot:
        cluster = self._kind == "aurora"
        created = item.get("SnapshotCreateTime")
        return ProviderSnapshot(
            snapshot_id=str(item["DBClusterSnapshotIdentifier" if cluster
                                 else "DBSnapshotIdentifier"]),
            arn=str(item.get("DBClusterSnapshotArn" if cluster else "DBSnapshotArn", "")),
            source_id=str(item.get("DBClusterIdentifier" if cluster
                                   else "DBInstanceIdentifier", "")),
            status=str(item.get("Status", "")),
            engine=str(item.get("Engine", "")),
            engine_version=str(item.get("EngineVersion", "")),
            size_gb=int(item.get("AllocatedStorage") or 0),
            encrypted=bool(item.get("StorageEncrypted" if cluster else "Encrypted", False)),
            kms_key_id=item.get("KmsKeyId"),
            created_at=created if isinstance(created, datetime) else None,
            tags=_tags(item))


def _tags(item: Mapping[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("TagList", [])}


class _Gone(Exception):
    """The snapshot named does not exist (a NotFound fault)."""

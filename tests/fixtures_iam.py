"""An S3 API that enforces IAM policies: a second moto server with authorization turned on.

moto checks each S3 request's signature against IAM users it knows and evaluates their
policies by action and resource ARN (not Condition blocks, and not per key for
DeleteObjects); docs/security.md's policies are tested against it as far as it goes.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from fixtures_s3 import moto_server

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client


@dataclass
class IamS3:
    """The endpoint, an all-powerful admin client, and a factory of restricted users."""

    endpoint: str
    admin_keys: dict[str, str]
    buckets: list[str] = field(default_factory=list)

    def client(self, keys: dict[str, str]) -> S3Client:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])

    @property
    def admin(self) -> S3Client:
        return self.client(self.admin_keys)

    def user(self, policy: dict[str, Any]) -> dict[str, str]:
        """A new IAM user holding only ``policy``: its keys as AWS_* environment variables."""
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=self.admin_keys["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=self.admin_keys["AWS_SECRET_ACCESS_KEY"])
        return _user(iam, policy)

    def rotate(self, keys: dict[str, str]) -> dict[str, str]:
        """Give the owner of ``keys`` a new key pair and delete the old one (AWS rotation)."""
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=self.admin_keys["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=self.admin_keys["AWS_SECRET_ACCESS_KEY"])
        for user in iam.list_users()["Users"]:
            name = user["UserName"]
            owned = iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
            if any(k["AccessKeyId"] == keys["AWS_ACCESS_KEY_ID"] for k in owned):
                new = iam.create_access_key(UserName=name)["AccessKey"]
                iam.delete_access_key(UserName=name, AccessKeyId=keys["AWS_ACCESS_KEY_ID"])
                return {"AWS_ACCESS_KEY_ID": new["AccessKeyId"],
                        "AWS_SECRET_ACCESS_KEY": new["SecretAccessKey"]}
        raise KeyError(keys["AWS_ACCESS_KEY_ID"])

    def bucket(self, *, object_lock: bool = False) -> str:
        name = f"pgvault-iam-{uuid.uuid4().hex[:12]}"
        self.admin.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        self.buckets.append(name)
        return name


def _user(iam: Any, policy: dict[str, Any]) -> dict[str, str]:
    name = f"u-{uuid.uuid4().hex[:10]}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="pgvault", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def _set_auth(endpoint: str, after: str) -> None:
    """Authorize every request from now on ("0"), or none ("inf")."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=after.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10):
        pass


@pytest.fixture(scope="session")
def iam_s3(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamS3]:
    """A moto server of its own (auth is server-wide), enforcing IAM from the first request."""
    with moto_server(tmp_path_factory.mktemp("iam") / "moto.log") as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        admin = _user(iam, {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"}]})
        _set_auth(endpoint, "0")
        yield IamS3(endpoint, admin)

"""A real S3 API over HTTP on loopback: moto's server mode in a child process."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from pgvault.storage.s3 import S3Options

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

# Dummy credentials and a clean AWS environment, so no developer profile or real
# endpoint leaks into the tests (and no test can reach a real account).
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "pgvault-test-key",
    "AWS_SECRET_ACCESS_KEY": "pgvault-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_AWS_UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto server on 127.0.0.1, with dummy AWS credentials set."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in _AWS_UNSET:
            mp.delenv(name, raising=False)
        empty: Path = tmp_path_factory.mktemp("aws")
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        with moto_server(empty / "moto.log") as url:
            yield url


@contextlib.contextmanager
def moto_server(log_path: Path) -> Iterator[str]:
    """A moto server process on a free loopback port, stopped afterwards; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def s3_client(s3_server: str) -> S3Client:
    """A plain boto3 client for the moto server, to look behind a storage's back."""
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client: S3Client) -> Iterator[str]:
    """A fresh, uniquely named bucket, emptied and removed afterwards."""
    name = f"pgvault-test-{uuid.uuid4().hex[:16]}"
    client = s3_client
    client.create_bucket(Bucket=name)
    yield name
    # Free the server's memory: large test objects would pile up for the whole session.
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        objects: list[ObjectIdentifierTypeDef] = [
            {"Key": o["Key"]} for o in page.get("Contents", [])
        ]
        if objects:
            client.delete_objects(Bucket=name, Delete={"Objects": objects})
    client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_options(s3_server: str) -> S3Options:
    """Options for the moto endpoint: path-style addressing, SSE-S3 as in production."""
    return S3Options(endpoint_url=s3_server, region="us-east-1", path_style=True)

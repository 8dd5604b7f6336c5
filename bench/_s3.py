"""A loopback S3 server (moto's server mode) for the S3 upload comparison."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

BUCKET = "pgvault-bench"
# Dummy credentials and an empty AWS config: no developer profile or real account is reached.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "pgvault-bench-key",
    "AWS_SECRET_ACCESS_KEY": "pgvault-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")

# Fallback when the aws CLI is missing: the same streaming multipart upload of stdin, by the
# library the aws CLI itself uses (s3transfer via boto3's upload_fileobj).
UPLOAD_STDIN_PY = (
    "import sys, boto3; "
    "boto3.client('s3', endpoint_url=sys.argv[1]).upload_fileobj("
    "sys.stdin.buffer, sys.argv[2], sys.argv[3], ExtraArgs={'ServerSideEncryption': 'AES256'})"
)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's S3 server on 127.0.0.1 with one bucket; not a descendant of measured commands."""

    def __init__(self, workdir: Path) -> None:
        """Remember where the AWS config and the server log go; start() runs it."""
        self.workdir = workdir
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    def env(self) -> dict[str, str]:
        """Variables that point the aws CLI and boto3 at dummy credentials and no profile."""
        return {**AWS_ENV, "AWS_CONFIG_FILE": str(self.workdir / "aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "aws-credentials")}

    def start(self) -> None:
        """Start the server, wait until it answers, create the bucket."""
        import boto3

        self.workdir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = (self.workdir / "moto.log").open("wb")
        # A new session keeps Ctrl-C away from it: the harness stops it itself.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {self.url}") from None
                time.sleep(0.1)
        self._client = boto3.Session(
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.url)
        self._client.create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        """Terminate the server; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _keys(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under prefix."""
        out: list[tuple[str, int]] = []
        for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET, Prefix=prefix):
            out += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
        return out

    def size(self, prefix: str) -> int:
        """Total bytes stored under prefix."""
        return sum(size for _, size in self._keys(prefix))

    def clear(self, prefix: str) -> None:
        """Delete every object and pending multipart upload under prefix (frees moto's memory)."""
        for up in self._client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get(
                "Uploads", []):
            self._client.abort_multipart_upload(Bucket=BUCKET, Key=up["Key"],
                                                UploadId=up["UploadId"])
        keys = [k for k, _ in self._keys(prefix)]
        for i in range(0, len(keys), 1000):
            self._client.delete_objects(Bucket=BUCKET, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]]})


def upload_command(aws: str | None, endpoint: str, key: str) -> tuple[str, str]:
    """Shell words that upload stdin to s3://BUCKET/key, and a label naming the tool."""
    if aws:
        return (f"{aws} s3 cp - s3://{BUCKET}/{key} --endpoint-url {endpoint} --sse AES256 "
                "--only-show-errors", "aws s3 cp -")
    return (f"{sys.executable} -c \"{UPLOAD_STDIN_PY}\" {endpoint} {BUCKET} {key}",
            "boto3 upload_fileobj(stdin)")


def find_aws() -> str | None:
    """The aws CLI next to this Python (the bench extra), else on PATH, else None."""
    beside = Path(sys.executable).parent / "aws"
    return str(beside) if beside.exists() else shutil.which("aws")

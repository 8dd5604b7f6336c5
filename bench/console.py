"""The console's overview of many databases: how the listing fix and the read view pay.

    .venv/bin/python bench/console.py [--databases 200] [--backups 5] [--rounds 5] [--s3]

A faked repository (tests/test_console.py's fake_repository: manifests, drill records and
run histories, no data) in a folder, and with --s3 in a bucket of a moto server started
here. Each round renders the overview once per variant, in alternating order:

- before: every database's status read straight from the storage (four listings and the
  reads per database), the folder walked from its root for each listing (the old `_walk`);
- listing fix: the same, with the folder listing that starts in the prefix's folder;
- console: the console as it is (one listing per record folder per request, records and
  statuses reused while the listing shows them unchanged).

Prints the median and the spread (min-max) of each variant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pgvault import config
from pgvault.storage.base import Storage
from pgvault.storage.local import LocalStorage
from pgvault.vault import Vault
from pgvault.web import views
from pgvault.web.app import Console


@contextlib.contextmanager
def walk_from_root(enabled: bool) -> Iterator[None]:
    """The listing as it was: every walk starts at the repository's root."""
    if not enabled:
        yield
        return
    original = LocalStorage._start
    LocalStorage._start = lambda self, prefix: (self.root, "")  # type: ignore[method-assign]
    try:
        yield
    finally:
        LocalStorage._start = original  # type: ignore[method-assign]


def variants(storage: Storage) -> dict[str, Callable[[], Any]]:
    vault = Vault.open(config.load({"repo": "memory://"}, {}), storage=storage)
    names = vault.catalog.databases()
    sources = [(name, vault) for name in names]
    console = Console(lambda: sources, host="127.0.0.1", token=None)
    console.answer("GET", "/", {})  # its first request reads every record once

    def raw(old_walk: bool) -> Callable[[], Any]:
        def render() -> Any:
            with walk_from_root(old_walk):
                rows = views.overview(sources, datetime.now(UTC))
                return console._page("overview.html", 200, rows=rows, now=datetime.now(UTC),
                                     counts={"CRITICAL": 0, "WARNING": 0, "OK": 0,
                                             "UNKNOWN": 0}, took=0.0)
        return render

    found: dict[str, Callable[[], Any]] = {}
    if isinstance(storage, LocalStorage):
        found["before"] = raw(True)
        found["listing fix"] = raw(False)
    else:
        found["before"] = raw(False)
    found["console"] = lambda: console.answer("GET", "/", {})
    return found


def measure(storage: Storage, rounds: int) -> None:
    runs = variants(storage)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for n in range(rounds):
        order = list(runs) if n % 2 == 0 else list(reversed(runs))
        for name in order:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    for name, found in times.items():
        print(f"  {name:12} median {statistics.median(found) * 1000:7.0f} ms  "
              f"(min {min(found) * 1000:.0f}, max {max(found) * 1000:.0f}, {len(found)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--databases", type=int, default=200)
    parser.add_argument("--backups", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--s3", action="store_true", help="also a bucket on a moto server")
    args = parser.parse_args()
    from test_console import fake_repository

    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="pgvault-bench-console-") as tmp:
        storage = fake_repository(args.databases, args.backups, now,
                                  LocalStorage(Path(tmp) / "repo"))
        print(f"folder, {args.databases} databases x {args.backups} backups:")
        measure(storage, args.rounds)
        if args.s3:
            from fixtures_s3 import _AWS_ENV, moto_server

            os.environ.update(_AWS_ENV)
            import boto3

            from pgvault.storage.s3 import S3Options, S3Storage

            with moto_server(Path(tmp) / "moto.log") as url:
                boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(
                    Bucket="bench-console")
                storage = fake_repository(args.databases, args.backups, now, S3Storage(
                    "bench-console", "many", S3Options(endpoint_url=url, region="us-east-1",
                                                       path_style=True)))
                print(f"S3 (moto), {args.databases} databases x {args.backups} backups:")
                measure(storage, args.rounds)


if __name__ == "__main__":
    main()

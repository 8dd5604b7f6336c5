"""Prometheus for runs without the daemon: a node_exporter textfile and a Pushgateway.

The textfile is replaced atomically (temp file, rename), so node_exporter never reads
half of it. Pushes use push-add (POST) into a group per database: a failed run replaces
only the series it sends, and every value comes from the repository, so a failure never
erases the last success.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from pgvault import logs

if TYPE_CHECKING:
    from pgvault.config import MetricsSettings
    from pgvault.metrics import Metrics

log = logs.get("metrics")


class PublishError(Exception):
    """The textfile or the Pushgateway could not be written (already logged)."""


def write_textfile(metrics: Metrics, path: str) -> None:
    """Replace ``path`` (a .prom file in node_exporter's textfile directory) atomically."""
    from prometheus_client import write_to_textfile

    write_to_textfile(path, metrics.registry)


def push(metrics: Metrics, url: str, job: str, database: str, timeout: float) -> None:
    """push-add ``database``'s series to the Pushgateway group {job, database}."""
    from prometheus_client import pushadd_to_gateway
    from prometheus_client.exposition import basic_auth_handler, default_handler

    parts = urlsplit(url)
    handler = default_handler
    if parts.username is not None:
        user, password = parts.username, parts.password or ""

        def handler(url: str, method: str, timeout: float | None,  # type: ignore[misc]
                    headers: list[tuple[str, str]], data: bytes) -> object:
            return basic_auth_handler(url, method, timeout, headers, data, user, password)

        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    pushadd_to_gateway(url, job=job, registry=metrics.only(database),
                       grouping_key={"database": database}, timeout=timeout, handler=handler)


def publish(metrics: Metrics, settings: MetricsSettings, database: str, *,
            timeout: float) -> None:
    """Write the textfile and push ``database``, as configured; PublishError if either fails."""
    failed = False
    if settings.textfile:
        try:
            write_textfile(metrics, settings.textfile)
        except OSError as exc:
            log.warning("cannot write the metrics textfile %s: %s", settings.textfile,
                        exc.strerror or exc)
            failed = True
    if settings.pushgateway_url is not None:
        try:
            push(metrics, settings.pushgateway_url.get_secret_value(),
                 settings.pushgateway_job, database, timeout)
        except Exception as exc:
            # urllib errors carry no URL; the gateway's address is a secret like a webhook's.
            log.warning("cannot push metrics to the Pushgateway: %s",
                        getattr(exc, "reason", None) or exc)
            failed = True
    if failed:
        raise PublishError("metrics not published")

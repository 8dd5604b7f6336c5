"""Shared fixtures live in plugin modules, one per real part the tests start."""

import signal
from collections.abc import Iterator

import pytest

from pgvault import redact

pytest_plugins = ["fixtures_pg", "fixtures_s3", "fixtures_iam", "fixtures_tls", "http_recorder"]

# A suite started in the background by a shell (`scripts/test &`) inherits SIGINT ignored, and
# so would every pgvault it starts: the Ctrl-C tests would wait for an exit that never comes.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _secrets_of_this_test_only() -> Iterator[None]:
    """A secret a test registers, itself or through pgvault code it calls in this process
    (a password parsed from a URL), is forgotten after it: one process runs every test, and
    a later test must not find its own words masked ("other" -> "***")."""
    with redact.scope():
        yield

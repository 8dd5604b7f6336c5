"""Shared fixtures live in plugin modules, one per real part the tests start."""

import signal

pytest_plugins = ["fixtures_pg", "fixtures_s3", "fixtures_iam", "http_recorder"]

# A suite started in the background by a shell (`scripts/test &`) inherits SIGINT ignored, and
# so would every pgvault it starts: the Ctrl-C tests would wait for an exit that never comes.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

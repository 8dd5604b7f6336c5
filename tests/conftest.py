"""Shared fixtures live in plugin modules, one per real part the tests start."""

pytest_plugins = ["fixtures_pg", "fixtures_s3", "fixtures_iam", "http_recorder"]

"""Shared fixtures live in plugin modules, one per real part the tests start."""

pytest_plugins = ["fixtures_pg", "fixtures_s3"]

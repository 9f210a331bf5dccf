"""Shared fixtures live in small modules; this file only registers them."""

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_hub", "tests.fixtures_backends"]

"""Fixtures that start a real SeaweedFS S3 server on loopback."""

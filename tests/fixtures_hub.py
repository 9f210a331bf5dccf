"""Fixtures that start a real hub and worker pools (filled in by the core runtime work)."""

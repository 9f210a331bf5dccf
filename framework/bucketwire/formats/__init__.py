"""Store event formats: bytes in, Events out."""

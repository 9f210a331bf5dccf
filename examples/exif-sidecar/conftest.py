"""Lets `pytest` find bucketwire_exif_sidecar from a checkout (pytest puts this directory on sys.path)."""

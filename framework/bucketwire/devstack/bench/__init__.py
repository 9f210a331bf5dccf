"""`bucketwire bench`: every figure next to a baseline measured in the same run, reported as a ratio."""

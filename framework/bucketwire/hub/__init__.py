"""The hub: the one stateful process (ingress, journal, dispatch, fan-out)."""

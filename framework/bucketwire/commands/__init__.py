"""Self-contained click commands added to the main `bucketwire` group (one `cli.add_command` line each).

Each module depends only on the public core (config, client, sources, seaweed) and not on `bucketwire.cli`,
so the group can import them without a cycle.
"""

"""Worker pools: the supervisor, the children that run plugins, plugin loading."""

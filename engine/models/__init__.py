"""Model implementations and loaders."""

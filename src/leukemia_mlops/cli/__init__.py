"""Console entry points: thin wrappers that load config and call the library."""

"""Dataset loaders. Hub names and local files in the same schema go through the same `datasets` code path."""

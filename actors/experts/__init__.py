"""The expert shard process: routed experts of its assignment, served to every attention worker."""

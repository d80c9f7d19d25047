"""The Engram service (shards of the tables) and its client on the attention worker."""

"""Shard I/O through fsspec: URLs, streaming tar reading, deterministic tar writing, atomic commits."""

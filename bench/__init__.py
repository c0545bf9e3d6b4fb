"""Benchmarks: each prints one JSON document (and a short summary on stderr)."""

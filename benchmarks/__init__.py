"""Reproducible measurements of vramchat: `make bench` runs them and appends to docs/benchmarks.md."""

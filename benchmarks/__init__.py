"""Benchmarks and the GPU acceptance run (scripts; also imported by tests as oracles)."""

"""Benchmarks (``make bench``): training step, generation, data loading, retrieval, FLOPs.

Speed is checked here, never in unit tests. Every comparison is a ratio of two
measurements taken in the same run on the same machine.
"""

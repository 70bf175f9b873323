"""Parity, speed and memory checks of the JAX and PyTorch models (results in benchmarks/RESULTS.md)."""

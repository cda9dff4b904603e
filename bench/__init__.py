"""Benchmarks: serving (through the front end), one batch, kernels, KV transfer."""

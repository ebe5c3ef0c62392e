"""Benchmarks: each scenario starts its own servers on loopback and prints figures."""

"""Benchmarks of attenscribble_ops: speed and memory of every op and backend against the reference
and the peers. Run ``python -m benchmarks --help``."""

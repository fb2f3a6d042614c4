"""Benchmarks that print figures (never timed assertions). `python -m bench` runs them all."""

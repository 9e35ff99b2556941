"""Benchmarks: Tenure's layers against raw Temporal on the same server (`python -m bench`)."""

"""Tenure's domain: entity declarations and the deterministic actor runtime that hosts them.

Nothing in this package does I/O; it runs inside Temporal workflows.
"""

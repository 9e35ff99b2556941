"""The event loop a worker process runs on: uvloop where it is installed (Linux and macOS),
asyncio's own elsewhere.

A worker's main loop wakes for every activation, activity and reply the SDK's core hands
it from its own threads, and for every Redis reply; uvloop does each wake-up and each
socket read in C. Workflow code is untouched: the SDK runs each workflow on an event loop
of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
    uvloop = None  # type: ignore[assignment]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new event loop, as `asyncio.run` does."""
    if uvloop is None:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)

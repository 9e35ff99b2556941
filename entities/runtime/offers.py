"""Offers: snapshots an entity hands to the worker that runs it, to publish outside its
history.

A publish by activity costs Temporal an activity and the workflow task its completion
brings, for every change. Between the publishes its interval lets through, an entity instead
offers its snapshot to the worker process that runs it (`offer`), which writes it to the
cache at once (`workers/offers.py`). An offer is not recorded anywhere: a worker that dies
before it writes one loses it, and so does a Redis that is down. So an entity that offers
still publishes by activity once its interval allows, carrying every change since its last
publish by activity, and the change stream appends each change once whichever brought it.

An offer must be of a state that will have been: Temporal can refuse a workflow task's
completion and run the task again, later, where a rule that reads the clock may decide
otherwise. So the worker writes an offer only once Temporal has recorded the task that made
it (`workers/offers.py`); a task that ends the run, which Temporal refuses when a command
came meanwhile, takes its offers back (`withdraw`); and a state that holds an update applied
in the same task is not offered at all.

The worker collects the offers of one activation (`collecting`) on the activation's thread;
during replay, or on a worker that does not collect, `offer` does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Offer:
    """One entity's `Publication`, as JSON, at `revision`."""

    entity_type: str
    entity_id: str
    revision: int
    publication: bytes


_collected = threading.local()


def collects() -> bool:
    """Whether the current activation's offers are collected (a worker that publishes them
    runs it)."""
    return getattr(_collected, "offers", None) is not None


def offer(made: Offer) -> None:
    """Hand `made` to the worker running this activation; nothing when none collects."""
    offers: list[Offer] | None = getattr(_collected, "offers", None)
    if offers is not None:
        offers.append(made)


def withdraw() -> None:
    """Take back what this activation offered: it ends its run (continue-as-new, or its
    last command), and Temporal refuses such a task when a command came meanwhile, to run
    it again with that command, at another time."""
    offers: list[Offer] | None = getattr(_collected, "offers", None)
    if offers is not None:
        offers.clear()


@contextmanager
def collecting() -> Iterator[list[Offer]]:
    """The offers made on this thread while inside, in the order made."""
    offers: list[Offer] = []
    _collected.offers = offers
    try:
        yield offers
    finally:
        _collected.offers = None

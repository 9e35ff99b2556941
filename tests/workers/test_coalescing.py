"""Group commit of signals, with a fake sender (pure code; the real path is tested in
tests/entities/test_runtime.py against a Temporal server)."""

from __future__ import annotations

import asyncio

import pytest

from entities.errors import ErrorCode, TenureError
from entities.runtime.envelope import CommandEnvelope
from workers.coalescing import SignalCoalescer


def envelope(n: int) -> CommandEnvelope:
    return CommandEnvelope(command_id=f"c{n}", name="deposit", payload={"amount": n})


class SlowSender:
    """Records each batch; holds every signal in flight until released."""

    def __init__(self, fail_on: set[str] | None = None) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on or set()

    async def __call__(self, workflow_id: str, batch: list[CommandEnvelope]) -> None:
        self.batches.append((workflow_id, [e.command_id for e in batch]))
        await self.release.wait()
        if self.fail_on & {e.command_id for e in batch}:
            raise RuntimeError("signal refused")


async def test_a_lone_command_goes_at_once_in_its_own_signal() -> None:
    sender = SlowSender()
    sender.release.set()
    await SignalCoalescer(sender).send("account:1", envelope(1))
    assert sender.batches == [("account:1", ["c1"])]


async def test_commands_meeting_in_flight_share_the_next_signal_in_order() -> None:
    sender = SlowSender()
    coalescer = SignalCoalescer(sender)
    first = asyncio.create_task(coalescer.send("account:1", envelope(0)))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(coalescer.send("account:1", envelope(n))) for n in range(1, 8)]
    other = asyncio.create_task(coalescer.send("account:2", envelope(99)))
    await asyncio.sleep(0)
    sender.release.set()
    await asyncio.gather(first, *rest, other)
    assert ("account:1", ["c0"]) in sender.batches
    assert ("account:1", [f"c{n}" for n in range(1, 8)]) in sender.batches
    assert ("account:2", ["c99"]) in sender.batches
    assert len(sender.batches) == 3


async def test_batches_are_capped() -> None:
    sender = SlowSender()
    coalescer = SignalCoalescer(sender, max_batch=3)
    tasks = [asyncio.create_task(coalescer.send("w", envelope(n))) for n in range(8)]
    await asyncio.sleep(0)
    sender.release.set()
    await asyncio.gather(*tasks)
    # All eight queued before the first signal left: three signals of at most three.
    assert [ids for _, ids in sender.batches] == [
        ["c0", "c1", "c2"],
        ["c3", "c4", "c5"],
        ["c6", "c7"],
    ]


async def test_a_failed_signal_fails_exactly_the_commands_it_carried() -> None:
    sender = SlowSender(fail_on={"c1"})
    coalescer = SignalCoalescer(sender)
    first = asyncio.create_task(coalescer.send("w", envelope(0)))
    await asyncio.sleep(0)
    second = [asyncio.create_task(coalescer.send("w", envelope(n))) for n in (1, 2)]
    await asyncio.sleep(0)
    sender.release.set()
    await first
    for task in second:
        with pytest.raises(RuntimeError, match="signal refused"):
            await task
    await coalescer.send("w", envelope(3))  # the next one is unaffected
    assert sender.batches[-1] == ("w", ["c3"])


async def test_commands_waiting_for_one_entity_are_bounded_and_the_rest_refused() -> None:
    """While a signal hangs (Temporal not answering, 5 s a try), a flood to one entity
    parked every request, tens of thousands in a minute. At most ten signals' worth wait;
    the rest are refused UNAVAILABLE at once, sent nowhere, and those waiting still go."""
    sender = SlowSender()
    coalescer = SignalCoalescer(sender, max_batch=10)
    sends = [asyncio.create_task(coalescer.send("wf", envelope(n))) for n in range(150)]
    await asyncio.sleep(0.01)
    refused = [task for task in sends if task.done()]
    assert len(refused) == 150 - 100  # a hundred waiting, the first of them now in flight
    for task in refused:
        error = task.exception()
        assert isinstance(error, TenureError) and error.code is ErrorCode.UNAVAILABLE
    sender.release.set()
    await asyncio.gather(*(task for task in sends if task not in refused))
    sent = [command for _, batch in sender.batches for command in batch]
    assert sent == [f"c{n}" for n in range(100)]

"""Update lanes (pure): commands beyond an entity's updates in flight wait and go together in
the next update, in the order they came; a waiter that gives up is left out; a full lane
sends commands another way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from workers.update_lanes import UpdateLanes


def later() -> float:
    """A deadline an hour from now. (One taken once, at import, had passed when a slow run
    of the whole suite came to these tests after an hour: the lanes let every command go,
    and `Entity.answer` waited for an update for good.)"""
    return time.monotonic() + 3600


class Entity:
    """Answers each update when told to (`answer`), recording what each carried."""

    def __init__(self) -> None:
        self.updates: list[list[str]] = []
        self._pending: list[asyncio.Future[None]] = []

    async def send(self, workflow_id: str, commands: Sequence[str], deadline: float) -> list[str]:
        self.updates.append(list(commands))
        gate = asyncio.get_running_loop().create_future()
        self._pending.append(gate)
        await gate
        return [f"{workflow_id}:{command}" for command in commands]

    async def answer(self) -> None:
        """Answer the oldest update in flight, and let the lanes move on."""
        while not self._pending:
            await asyncio.sleep(0)
        self._pending.pop(0).set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)


async def test_commands_beyond_the_updates_in_flight_go_together_in_order() -> None:
    entity = Entity()
    lanes = UpdateLanes[str, str](entity.send, per_entity=2, max_batch=3, max_waiting=10)
    sent = [asyncio.create_task(lanes.request("a", f"c{n}", 0.0, later())) for n in range(7)]
    await asyncio.sleep(0)
    assert entity.updates == [["c0"], ["c1"]]  # the first two at once, alone
    for _ in range(4):
        await entity.answer()
    # as each update is answered, the next carries what waited, three at most, in order
    assert entity.updates == [["c0"], ["c1"], ["c2", "c3", "c4"], ["c5", "c6"]]
    assert [await s for s in sent] == [f"a:c{n}" for n in range(7)]
    assert len(lanes) == 0


async def test_a_waiter_is_let_go_at_its_time_and_goes_another_way() -> None:
    entity = Entity()
    lanes = UpdateLanes[str, str](entity.send, per_entity=1, max_batch=10, max_waiting=10)
    first = asyncio.create_task(lanes.request("a", "c0", 0.0, later()))
    await asyncio.sleep(0)
    assert await lanes.request("a", "c1", 0.0, time.monotonic() + 0.05) is None
    assert await lanes.request("a", "c2", 0.0, time.monotonic() - 1) is None
    await entity.answer()
    assert await first == "a:c0"
    assert entity.updates == [["c0"]]  # neither was sent
    assert len(lanes) == 0


async def test_a_waiter_that_gives_up_is_left_out_and_a_full_lane_says_none() -> None:
    entity = Entity()
    lanes = UpdateLanes[str, str](entity.send, per_entity=1, max_batch=10, max_waiting=2)
    first = asyncio.create_task(lanes.request("a", "c0", 0.0, later()))
    gone = asyncio.create_task(lanes.request("a", "c1", 0.0, later()))
    kept = asyncio.create_task(lanes.request("a", "c2", 0.0, later()))
    await asyncio.sleep(0)
    assert await lanes.request("a", "c3", 0.0, later()) is None  # two wait already
    gone.cancel()
    await entity.answer()
    await entity.answer()
    assert entity.updates[:2] == [["c0"], ["c2"]]
    assert (await first, await kept) == ("a:c0", "a:c2")
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_failed_update_fails_each_command_it_carried_and_errors_go_to_theirs() -> None:
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def send(
        workflow_id: str, commands: Sequence[str], deadline: float
    ) -> list[str | Exception | None]:
        calls.append(list(commands))
        await release.wait()
        if len(commands) == 3:
            raise RuntimeError("refused")
        if len(commands) == 2:  # one answered, one failed on its own
            return ["ok", ValueError(commands[1])]
        return ["ok"]

    lanes = UpdateLanes[str, str](send, per_entity=1, max_batch=3, max_waiting=10)
    tasks = [asyncio.create_task(lanes.request("a", f"c{n}", 0.0, later())) for n in range(6)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == [["c0"], ["c1", "c2", "c3"], ["c4", "c5"]]
    assert results[0] == "ok"
    assert [type(r) for r in results[1:4]] == [RuntimeError] * 3  # the whole update failed
    assert results[4] == "ok" and isinstance(results[5], ValueError)  # each its own answer
    assert len(lanes) == 0

"""A bounded idempotency ledger: the outcome of each recent command, by command id."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from entities.runtime.envelope import Outcome


class Ledger:
    """Remembers the last `capacity` command outcomes, oldest evicted first.

    It travels across continue-as-new, so a command retried after a new run started is
    still recognised; Temporal itself dedupes nothing across runs.
    """

    def __init__(self, capacity: int, entries: Iterable[Outcome] = ()) -> None:
        self.capacity = capacity
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        for entry in entries:
            self.record(entry)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._outcomes

    def __len__(self) -> int:
        return len(self._outcomes)

    def get(self, command_id: str) -> Outcome | None:
        return self._outcomes.get(command_id)

    def record(self, outcome: Outcome) -> None:
        self._outcomes[outcome.command_id] = outcome
        while len(self._outcomes) > self.capacity:
            self._outcomes.popitem(last=False)

    def entries(self) -> list[Outcome]:
        return list(self._outcomes.values())

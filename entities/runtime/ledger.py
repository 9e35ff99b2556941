"""A bounded idempotency ledger: the outcome of each recent command, by command id."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from entities.runtime.envelope import Outcome

MAX_BYTES = 640 * 1024
"""What the ledger may weigh in the run input it travels in, which Temporal refuses past 2 MB
(and then fails the workflow task for good): ids, senders and messages are bounded, but 4,096
outcomes of long ones would not be."""


def _weight(outcome: Outcome) -> int:
    """What an outcome adds to the serialized ledger, in bytes."""
    return len(outcome.model_dump_json())


class Ledger:
    """Remembers the last `capacity` command outcomes, oldest evicted first, and fewer when
    they would weigh more than `max_bytes`.

    It travels across continue-as-new, so a command retried after a new run started is
    still recognised; Temporal itself dedupes nothing across runs.
    """

    def __init__(
        self, capacity: int, entries: Iterable[Outcome] = (), max_bytes: int = MAX_BYTES
    ) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self._bytes = 0
        for entry in entries:
            self.record(entry)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._outcomes

    def __len__(self) -> int:
        return len(self._outcomes)

    def get(self, command_id: str) -> Outcome | None:
        return self._outcomes.get(command_id)

    def record(self, outcome: Outcome) -> None:
        replaced = self._outcomes.get(outcome.command_id)
        if replaced is not None:  # keeps its place, as it always has
            self._bytes -= _weight(replaced)
        self._outcomes[outcome.command_id] = outcome
        self._bytes += _weight(outcome)
        while len(self._outcomes) > self.capacity or (
            self._bytes > self.max_bytes and len(self._outcomes) > 1
        ):
            _, evicted = self._outcomes.popitem(last=False)
            self._bytes -= _weight(evicted)

    def entries(self) -> list[Outcome]:
        return list(self._outcomes.values())

    def newest_first(self) -> Iterator[Outcome]:
        return reversed(self._outcomes.values())

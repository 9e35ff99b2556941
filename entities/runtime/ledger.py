"""A bounded idempotency ledger: the outcome of each recent command, by command id."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from pydantic import BaseModel

from entities.runtime.envelope import Outcome

MAX_BYTES = 640 * 1024
"""What the ledger may weigh in the run input it travels in, which Temporal refuses past 2 MB
(and then fails the workflow task for good): ids, senders and messages are bounded, but 4,096
outcomes of long ones would not be."""


UNKNOWN_TIME = datetime.max.replace(tzinfo=UTC)
"""When an outcome without its time was settled, when nothing newer tells: any time. An
outcome without one (from before outcomes kept it) is older than every outcome with one, so
the oldest time the ledger still holds bounds it."""
NEARLY_FULL = 0.9
"""A ledger carried from a run that did not say what it forgot (older code) and this full may
have forgotten outcomes as recent as its oldest one."""


def in_bytes() -> bool:
    """Weigh in bytes: the default where no run from before sizes in bytes asks."""
    return True


def json_size(model: BaseModel, bytes_: Callable[[], bool] = in_bytes) -> int:
    """What `model` weighs as JSON: in bytes, as Temporal counts its payloads, unless
    `bytes_` answers no (a run begun when sizes were counted in characters; asked only for
    text that is not ASCII, where the two differ). A character of a name or a subject
    weighs up to four bytes: counted as one, a ledger and a state within their bounds could
    together pass Temporal's 2 MB, and the entity would be stuck for good."""
    encoded = model.__pydantic_serializer__.to_json(model)
    if encoded.isascii() or bytes_():
        return len(encoded)
    return len(encoded.decode())


class Ledger:
    """Remembers the last `capacity` command outcomes, oldest evicted first, and fewer when
    they would weigh more than `max_bytes`.

    It travels across continue-as-new, so a command retried after a new run started is
    still recognised; Temporal itself dedupes nothing across runs. With it travels
    `forgot_through`, the newest time of an outcome it evicted: a command settled after that
    is remembered if it came at all, one from before may have been forgotten.
    """

    def __init__(
        self,
        capacity: int,
        entries: Iterable[Outcome] = (),
        max_bytes: int = MAX_BYTES,
        forgot_through: datetime | None = None,
        unknown: datetime = UNKNOWN_TIME,
        bytes_: Callable[[], bool] = in_bytes,
    ) -> None:
        self.capacity = capacity
        self._in_bytes = bytes_
        """Whether it weighs in bytes (`json_size`)."""
        self.max_bytes = max_bytes
        self.forgot_through = forgot_through
        self._unknown = unknown
        """When an outcome without a time was settled at the latest, when none held has one:
        before the run that holds it began, for a ledger it was handed."""
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self._weights: dict[str, int] = {}
        self._bytes = 0
        self._kept: OrderedDict[str, tuple[int, Outcome]] | None = None
        """What it evicted since `keep_evicted`, oldest first, each with its eviction's
        number (None: it keeps nothing evicted)."""
        self.evictions = 0
        """How many outcomes it has evicted: the number of the next eviction."""
        for entry in entries:
            self.record(entry)

    @classmethod
    def carried(
        cls,
        capacity: int,
        entries: list[Outcome],
        forgot_through: datetime | None,
        told: bool,
        now: datetime,
        max_bytes: int = MAX_BYTES,
        bytes_: Callable[[], bool] = in_bytes,
    ) -> Ledger:
        """The ledger a run was handed. One handed over by a run that did not tell what it
        forgot (`told`) and that is nearly full is taken to have forgotten everything older
        than what it holds (than `now`, when none of it has a time)."""
        if not told and entries:
            weight = sum(json_size(entry, bytes_) for entry in entries)
            if len(entries) >= capacity or weight >= NEARLY_FULL * max_bytes:
                forgot_through = min((e.at for e in entries if e.at is not None), default=now)
        return cls(capacity, entries, max_bytes, forgot_through, unknown=now, bytes_=bytes_)

    def may_have_forgotten(self, since: datetime | None) -> bool:
        """Whether a command settled at `since` or later (at any time, with no `since`) may
        have been evicted, so that its absence does not show it never came."""
        if self.forgot_through is None:
            return False
        return since is None or self.forgot_through >= since

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._outcomes

    def __len__(self) -> int:
        return len(self._outcomes)

    def get(self, command_id: str) -> Outcome | None:
        return self._outcomes.get(command_id)

    def record(self, outcome: Outcome) -> None:
        command_id = outcome.command_id
        if command_id in self._outcomes:  # keeps its place, as it always has
            self._bytes -= self._weights[command_id]
        self._outcomes[command_id] = outcome
        weight = self._weights[command_id] = json_size(outcome, self._in_bytes)
        self._bytes += weight
        while len(self._outcomes) > self.capacity or (
            self._bytes > self.max_bytes and len(self._outcomes) > 1
        ):
            _, evicted = self._outcomes.popitem(last=False)
            self._bytes -= self._weights.pop(evicted.command_id)
            if self._kept is not None:
                self._kept.pop(evicted.command_id, None)
                self._kept[evicted.command_id] = (self.evictions, evicted)
            self.evictions += 1
            at = evicted.at or self._oldest_time(outcome)
            if self.forgot_through is None or at > self.forgot_through:
                self.forgot_through = at

    def _oldest_time(self, recorded: Outcome) -> datetime:
        """A bound on when an outcome without a time was settled: before the oldest that has
        one, the one being recorded included."""
        held = (outcome.at for outcome in self._outcomes.values() if outcome.at is not None)
        return next(held, recorded.at or self._unknown)

    def keep_evicted(self) -> None:
        """Keep, from now until `drop_evicted`, what it evicts, to be `recall`ed.

        A command held back (entities/runtime/backlog.py) is looked up when it is applied,
        which may be thousands of commands after it came: a client's retry that came while
        its first copy was remembered, held behind a backlog deeper than the ledger, found
        it forgotten and was applied again. Kept only in memory, never carried: a run never
        continues as new with commands held."""
        if self._kept is None:
            self._kept = OrderedDict()

    def drop_evicted(self) -> None:
        """Forget what `keep_evicted` kept, and keep nothing more."""
        self._kept = None

    def drop_evicted_before(self, number: int) -> None:
        """Forget the outcomes kept that were evicted before eviction `number`, and keep on.
        A held command needs only what was evicted after it came: so what is kept is bounded
        by what was applied since the oldest command held came, not by all a flood brought."""
        while self._kept:
            evicted, _ = next(iter(self._kept.values()))
            if evicted >= number:
                return
            self._kept.popitem(last=False)

    def recall(self, command_id: str) -> Outcome | None:
        """The outcome of `command_id` if it was evicted while kept (`keep_evicted`)."""
        kept = self._kept.get(command_id) if self._kept else None
        return kept[1] if kept is not None else None

    def entries(self) -> list[Outcome]:
        return list(self._outcomes.values())

    def newest_first(self) -> Iterator[Outcome]:
        return reversed(self._outcomes.values())

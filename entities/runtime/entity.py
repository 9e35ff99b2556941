"""Declaring an entity type: its state, options, commands and durable timer, all pure."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, StringConstraints, ValidationError, ValidationInfo

from entities.errors import ErrorCode, Rejected
from entities.runtime.listing import IndexValues, Listing
from entities.runtime.policy import READ, Owner, Policy

ENTITY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"

EntityId = Annotated[str, StringConstraints(pattern=ENTITY_ID_PATTERN)]
"""The id of an entity as a command names it, e.g. the account a cart belongs to."""

MAX_MONEY = 2**53 - 1
"""The largest amount or balance: what a GraphQL `Long` (a JSON number) carries exactly."""
MAX_AMOUNT = 10**15
"""The most one deposit, withdrawal or refund moves, and so the most a cart may total: its
checkout charges it in one withdrawal."""


STRICT_INPUTS = "tenure.strict_inputs"
"""The validation context's key saying which bounds of `strict_bound` apply: those added
up to that level."""
STRICT_INPUTS_PATCH = "strict-inputs-1"
"""Runs started since the bounds of `strict_bound` came apply them to the commands they
receive; older runs replay their histories as they were made (a command a bound now refuses
was applied then)."""
STRICT_INPUTS_2_PATCH = "strict-inputs-2"
"""The same for the bounds added at level 2 (no control characters in an email)."""
STRICT_INPUTS_3_PATCH = "strict-inputs-3"
"""The same at level 3: a cart totals at most what one withdrawal takes (MAX_AMOUNT)."""
STRICT_INPUTS_4_PATCH = "strict-inputs-4"
"""The same at level 4: text a person wrote has no invisible formatting (SHOWN_AS_WRITTEN)."""
STRICTEST = 4
"""The level of the latest bounds: what the API's edge and new runs apply."""
AT_THE_EDGE = 1_000
"""The level the API's edge validates at (`EntityType.parse`): every bound, and those of
`strict_bound(..., since=AT_THE_EDGE)`, which no run applies: a rule the entity's own
transition already keeps, checked again where a command comes in, so that it is refused
with nothing stored, while runs refuse it as they always did."""

RULES_1_PATCH = "entity-rules-1"
"""Runs started since it take the rules changed at level 1 (`CommandContext.rules_from`):
an inventory item refuses to take back a sale it no longer remembers; an entity refuses a
compensation whose undone command its ledger may have forgotten, and (OUTCOME_UNKNOWN) a
repeat first sent before what its ledger forgot. Older runs replay their histories as they
were made."""
RULES_2_PATCH = "entity-rules-2"
"""Runs started since it take the rules changed at level 2: an inventory item refuses to take
back a sale under an id it had been told to release without knowing it (it may have sold
and forgotten it). Asked only where it decides, outside the patch sets: no other run
records its marker."""
RULES_3_PATCH = "entity-rules-3"
"""Runs started since it take the rules changed at level 3: a cart names its checkout's
requests, reservation and order after the cart's incarnation (`CommandContext.incarnation`),
not after the time it applied `checkoutCart`. A repair's reset re-applies a `checkoutCart`
at a new time, and its checkout's requests, under new names, charged the account and took
the stock a second time."""
RULES_4_PATCH = "entity-rules-4"
"""Runs started since it take the rules changed at level 4: an account a saga charged is not
closed while the saga may still refund it (`entities.account.close`). Asked only where it
decides, outside the patch sets."""
RULES_5_PATCH = "entity-rules-5"
"""Runs started since it refuse a command whose name, `undoes` or fingerprint is too long to
record (`envelope.outsized`), and cut a refusal's message at `MAX_REFUSAL`: one outsized
refusal outweighed the whole ledger. Asked only of such a command or message, outside the
patch sets."""
NEWEST_RULES = 5
"""The level of the latest rules: what new runs, and transitions run outside a workflow,
apply."""


def _newest_rules(level: int) -> bool:
    return level <= NEWEST_RULES


def strict_bound(holds: Callable[[Any], bool], message: str, since: int = 1) -> Any:
    """A bound on a command field added after entities first ran, at level `since`: always
    applied at the API's edge, and in an entity's workflow only by runs started since that
    level's patch (STRICT_INPUTS); at AT_THE_EDGE, by no run."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if _level(info) >= since and not holds(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _level(info: ValidationInfo) -> int:
    """The level of bounds a validation applies (STRICT_INPUTS in its context)."""
    level: int = (info.context or {}).get(STRICT_INPUTS, STRICTEST)
    return level


def at_the_edge(info: ValidationInfo) -> bool:
    """Whether a model is validated at the API's edge (AT_THE_EDGE), where a rule across its
    fields that the entity's transition already keeps may be checked again, no run's."""
    return _level(info) >= AT_THE_EDGE


PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*$"
"""Text a person wrote has no control characters (they would be stored and shown to every
reader): the pattern of every such field."""

_SCRIPT_MARKS = frozenset("\u200c\u200d\u200e\u200f")
"""The formatting characters text in some scripts needs: the zero-width non-joiner and
joiner (Persian, Indic scripts, emoji sequences) and the left-to-right and right-to-left
marks (punctuation in mixed-direction text)."""


def shown_as_written(text: str) -> bool:
    """Whether `text` has no invisible formatting characters (but those scripts need)."""
    return not any(
        unicodedata.category(char) in ("Cf", "Zl", "Zp") and char not in _SCRIPT_MARKS
        for char in text
    )


SHOWN_AS_WRITTEN = strict_bound(
    shown_as_written,
    "no invisible formatting characters (a direction override, a zero-width space, a soft "
    "hyphen...) or line separators",
    since=4,
)
"""Text a person wrote is shown as written: nothing invisible that reorders it ("Ada" and
U+202E made a name read backwards to every reader) or hides in it. Beside PRINTABLE on
every such field."""


S = TypeVar("S", bound=BaseModel)
Opt = TypeVar("Opt", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)


@dataclass
class CommandContext(Generic[Opt]):
    """What a transition may know besides state and command: deterministic time and options.

    `effects` collects requests for the runtime to act on after the transition (for example
    starting a saga); a transition only appends to it, the runtime carries them out.
    """

    entity_id: str
    now: datetime
    options: Opt
    command_id: str = ""
    effects: list[Any] = field(default_factory=list)
    strict_inputs: int = STRICTEST
    """Up to which level the bounds added since entities first ran apply (`strict_bound`):
    0 none, STRICTEST all of them."""
    rules_from: Callable[[int], bool] = _newest_rules
    """Whether this run applies the rules an entity type changed at `level` (RULES_1_PATCH):
    asked only where a rule changed, so that a run begun before records its patch only
    where its answer matters."""
    sent_by: str | None = None
    """Who sent the command (`CommandEnvelope.sent_by`): a client as `role:subject`,
    `saga:<workflow id>` for a saga an entity started (`entities.runtime.effects.saga_sender`),
    None for a command from inside or from a sender not recorded."""
    incarnation: int = 0
    """Which life of the entity's id this is: when its first run began, in epoch
    milliseconds. The same in every run of the entity, a reset's included, and new when the
    id is used again after retention deleted the entity."""


@dataclass(frozen=True)
class Command(Generic[S, C, Opt]):
    """One command of an entity type, as code names it: `deposit`, never `"deposit"`.

    It carries what a sender needs (the entity type's name, the command's name, its payload
    model) and, called, runs the pure transition it was declared with."""

    entity_type: str
    name: str
    model: type[C]
    handler: Callable[[Any, C, CommandContext[Opt]], S]
    creates: bool = False
    internal: bool = False
    """Sent by Tenure's own workflows alone (the checkout saga's reports and compensations),
    never by a client: no public mutation sends it, and bulk commands refuse it."""

    def __call__(self, state: Any, command: C, ctx: CommandContext[Opt]) -> S:
        return self.handler(state, command, ctx)


Action = str | Command[Any, Any, Any]
"""An action a policy names: `READ`, or a command."""


def format_validation_error(exc: ValidationError) -> str:
    """A one-line, client-safe summary of what was wrong with a payload."""
    parts = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "input"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class EntityType(Generic[S, Opt]):
    """An entity declaration that the generic runtime can host as a workflow.

    Commands are registered with `@entity.command(Model)`; the function name is the command
    name. A command marked `creates=True` may run against an entity that does not exist yet
    (its handler then receives `None`); every other command on a missing entity is rejected
    with NOT_FOUND.
    """

    def __init__(
        self,
        name: str,
        *,
        state: type[S],
        options: type[Opt],
        is_terminal: Callable[[S], bool] = lambda _s: False,
    ) -> None:
        self.name = name
        self.state_model = state
        self.options_model = options
        self.is_terminal = is_terminal
        self.commands: dict[str, Command[S, Any, Opt]] = {}
        self.policy = Policy(frozenset())
        """Who may read it and send it which command; nothing until declared."""
        self.listed: Listing[S] = Listing()
        """What its listing filters and counts; by update and id only until declared."""
        self._deadline: Callable[[S, Opt], datetime | None] | None = None
        self._on_deadline: Callable[[S, CommandContext[Opt]], S] | None = None

    def command(
        self,
        model: type[C],
        *,
        creates: bool = False,
        internal: bool = False,
        name: str | None = None,
    ) -> Callable[[Callable[[Any, C, CommandContext[Opt]], S]], Command[S, C, Opt]]:
        """Register a transition `fn(state, command, ctx) -> new_state` for `model`, named
        `name` or after the function; the decorated name becomes the command's handle.
        `internal` marks one only Tenure's own workflows send (`Command.internal`)."""

        def register(fn: Callable[[Any, C, CommandContext[Opt]], S]) -> Command[S, C, Opt]:
            command_name = name or fn.__name__
            if command_name in self.commands:
                raise ValueError(f"{self.name} already has a command {command_name!r}")
            command = Command(self.name, command_name, model, fn, creates, internal)
            self.commands[command_name] = command
            return command

        return register

    def permit(
        self,
        *,
        actions: Iterable[Action],
        customer: Iterable[Action] = (),
        owner: Owner | None = None,
    ) -> None:
        """Declare the entity type's policy: the actions (`read` and commands) that may be
        done at all (admins may do them all, services what their scopes name), those a
        customer may do to what it owns, and how to tell whose an entity is."""
        named, customers = self._names(actions), self._names(customer)
        unknown = set(named) - set(self.commands) - {READ}
        if unknown:
            raise ValueError(f"{self.name} has no command {sorted(unknown)}")
        self.policy = Policy.of(named, customers, owner)

    def _names(self, actions: Iterable[Action]) -> list[str]:
        names = []
        for action in actions:
            if isinstance(action, Command):
                if action.entity_type != self.name:
                    raise ValueError(f"{action.name!r} is a command of {action.entity_type}")
                action = action.name
            names.append(action)
        return names

    def listing(
        self,
        *,
        status: Callable[[S], str] | None = None,
        tags: Mapping[str, Callable[[S], str]] | None = None,
        text: Callable[[S], list[str]] | None = None,
        numbers: Mapping[str, Callable[[S], int]] | None = None,
        owned_by: str | None = None,
    ) -> None:
        """Declare what its list filters on: a status (also counted per value), exact-match
        tags (a cart's account), text found by prefix besides the id, and numbers compared
        with a bound (an item's available stock); and, for customers' lists, `owned_by`:
        `id` or the tag that names the owning account."""
        if owned_by not in (None, "id", *(tags or {})):
            raise ValueError(f"{self.name} has no tag {owned_by!r} to own it by")
        self.listed = Listing(status, dict(tags or {}), text, dict(numbers or {}), owned_by)

    def statuses(self) -> frozenset[str] | None:
        """The values its listed status takes, when its state declares them as the types here
        do (a `status` field of an enum type); None when it lists no status, or when its
        state does not tell."""
        declared = self.state_model.model_fields.get("status")
        kind = declared.annotation if declared is not None else None
        if self.listed.status is None or not (isinstance(kind, type) and issubclass(kind, Enum)):
            return None
        return frozenset(str(member.value) for member in kind)

    def index_values(self, state: Mapping[str, Any] | None) -> IndexValues | None:
        """The entity's indexed values in `state`; None when there is no state."""
        return self.listed.values(self.state_model, state)

    def timer(
        self, deadline: Callable[[S, Opt], datetime | None]
    ) -> Callable[[Callable[[S, CommandContext[Opt]], S]], Callable[[S, CommandContext[Opt]], S]]:
        """Declare a durable timer: `deadline(state, options)` says when, the decorated
        function says what happens to the state once that moment has passed."""

        def register(
            fn: Callable[[S, CommandContext[Opt]], S],
        ) -> Callable[[S, CommandContext[Opt]], S]:
            self._deadline = deadline
            self._on_deadline = fn
            return fn

        return register

    @property
    def id_prefix(self) -> str:
        return f"{self.name}:"

    def workflow_id(self, entity_id: str) -> str:
        """Readable, stable workflow id: `account:42`."""
        return f"{self.name}:{entity_id}"

    def spec(self, name: str) -> Command[S, Any, Opt]:
        try:
            return self.commands[name]
        except KeyError:
            raise Rejected(
                ErrorCode.INVALID_INPUT, f"{self.name} has no command {name!r}"
            ) from None

    def parse(
        self, name: str, payload: Mapping[str, Any], *, strict: int = AT_THE_EDGE
    ) -> BaseModel:
        """Validate a command payload, rejecting it with INVALID_INPUT when malformed; with
        the bounds of `strict_bound` up to level `strict` (lower in a run older than them)."""
        spec = self.spec(name)
        try:
            command: BaseModel = spec.model.model_validate(payload, context={STRICT_INPUTS: strict})
            return command
        except ValidationError as exc:
            raise Rejected(ErrorCode.INVALID_INPUT, format_validation_error(exc)) from None

    def apply(
        self, state: S | None, name: str, payload: Mapping[str, Any], ctx: CommandContext[Opt]
    ) -> S:
        """Run one command's transition; raises Rejected when the entity refuses it."""
        spec = self.spec(name)
        command = self.parse(name, payload, strict=ctx.strict_inputs)
        if state is None and not spec.creates:
            raise Rejected(ErrorCode.NOT_FOUND, f"{self.name} {ctx.entity_id} does not exist")
        if state is not None and self.is_terminal(state):
            raise Rejected(ErrorCode.INVALID_TRANSITION, f"{self.name} {ctx.entity_id} is closed")
        result: S = spec.handler(state, command, ctx)
        return result

    def deadline(self, state: S | None, options: Opt) -> datetime | None:
        if state is None or self._deadline is None:
            return None
        return self._deadline(state, options)

    @property
    def timer_name(self) -> str:
        """What the entity's timer does, named as its function is (`become_dormant`)."""
        return self._on_deadline.__name__ if self._on_deadline is not None else "timer"

    def fire_deadline(self, state: S, ctx: CommandContext[Opt]) -> S:
        assert self._on_deadline is not None
        return self._on_deadline(state, ctx)

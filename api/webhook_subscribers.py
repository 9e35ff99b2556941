"""GraphQL binding of outbound webhooks, for admins only: register, list and remove
subscribers, and show and replay their dead letters (workers/webhook_subscribers.py keeps
them, entities/webhook_delivery.py delivers)."""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import strawberry
from strawberry.scalars import JSON

from api.context import Info
from api.gateway import check_idempotency_key
from api.response_size import bounded
from entities import catalog
from entities.errors import ErrorCode, TenureError
from entities.runtime.policy import Role
from entities.webhook_delivery import (
    WEBHOOK_WORKFLOW,
    WebhookDeliveryInput,
    webhook_workflow_id,
)
from workers.failures import REDIS_FAILURES, redis_unavailable
from workers.webhook_subscribers import (
    ALL_COMMANDS,
    MAX_ENTRY_PART,
    MAX_SUBSCRIBERS,
    DeadLetter,
    ReplaysFull,
    Subscriber,
    WebhookSubscribers,
    new_secret,
    signing_key,
)

MAX_URL_CHARS = 2048
MAX_COMMANDS = 50
MAX_SECRET_CHARS = 200
MAX_DEAD_LETTER_PAGE = 100
_ID = re.compile(r"wh_[0-9a-f]{1,32}")
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)
"""A host name's label: letters, digits and inner hyphens, as DNS has them, and underscores,
as container and service names have them."""


@strawberry.type(description="Where an entity type's changes are posted, signed.")
class WebhookSubscriber:
    id: strawberry.ID
    url: str
    events: JSON = strawberry.field(
        description='Entity types and the commands wanted: {"account": ["deposit"], '
        '"inventory": ["*"]}.'
    )
    created_at: datetime
    created_by: str
    dead_letters: int = strawberry.field(description="Deliveries whose retries ran out.")

    @classmethod
    def of(cls, subscriber: Subscriber, dead_letters: int) -> WebhookSubscriber:
        return cls(
            id=strawberry.ID(subscriber.id),
            url=subscriber.url,
            events=dict(subscriber.events),  # type: ignore[arg-type]
            created_at=subscriber.created_at,
            created_by=subscriber.created_by,
            dead_letters=dead_letters,
        )


@strawberry.type(
    description="A subscriber just registered, with its secret, shown only in answers to "
    "its registration (the first, and the same sent again under its idempotency key)."
)
class RegisteredWebhookSubscriber:
    subscriber: WebhookSubscriber
    secret: str = strawberry.field(
        description="whsec_ and base64: the key of every delivery's webhook-signature."
    )


@strawberry.type(description="A delivery whose retries ran out, as it was sent.")
class WebhookDeadLetter:
    id: strawberry.ID
    webhook_id: str
    entity_type: str
    entity_id: str
    body: str
    attempts: int
    error: str = strawberry.field(description="What the last attempt met.")
    first_attempt_at: datetime
    failed_at: datetime

    @classmethod
    def of(cls, letter: DeadLetter) -> WebhookDeadLetter:
        return cls(
            id=strawberry.ID(letter.id),
            webhook_id=letter.webhook_id,
            entity_type=letter.entity_type,
            entity_id=letter.entity_id,
            body=letter.body,
            attempts=letter.attempts,
            error=letter.error,
            first_attempt_at=letter.first_attempt_at,
            failed_at=letter.failed_at,
        )


@strawberry.type(description="Dead letters, oldest first.")
class WebhookDeadLetterPage:
    entries: list[WebhookDeadLetter] = bounded(MAX_DEAD_LETTER_PAGE, paged=True)
    has_more: bool
    end_cursor: str | None = strawberry.field(description="Give as `after` for the next page.")


def _subscribers(info: Info) -> WebhookSubscribers:
    """The registry, for admins only: integrations are an operator's to wire up."""
    if info.context.principal.role is not Role.ADMIN:
        raise TenureError(ErrorCode.FORBIDDEN, "not allowed for this caller")
    cache = info.context.gateway.cache
    return WebhookSubscribers(cache.client, cache.prefix)


@asynccontextmanager
async def _redis() -> AsyncIterator[None]:
    try:
        yield
    except REDIS_FAILURES as exc:
        raise redis_unavailable("the webhook registry", exc) from exc
    except ReplaysFull as exc:
        raise TenureError(
            ErrorCode.LIMIT_REACHED, f"{exc}: replay more once the subscriber has taken them"
        ) from None


def _invalid(message: str) -> TenureError:
    return TenureError(ErrorCode.INVALID_INPUT, message)


def _checked_id(subscriber_id: str) -> str:
    if not _ID.fullmatch(subscriber_id):
        raise TenureError(ErrorCode.NOT_FOUND, "no such webhook subscriber")
    return subscriber_id


def _entry_id(value: str) -> bool:
    """Whether `value` is a stream entry id Redis takes (whether or not there is one)."""
    matched = _ENTRY_ID.fullmatch(value)
    return matched is not None and all(int(part) <= MAX_ENTRY_PART for part in matched.groups())


def checked_url(url: str) -> str:
    """An absolute http or https URL that can be delivered to (a host name or an IP address,
    a port from 1 to 65535, no credentials), as it will be stored; else INVALID_INPUT.
    Private and loopback addresses are taken: local receivers are integrations too."""
    if len(url) > MAX_URL_CHARS:
        raise _invalid(f"url: at most {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.host  # IDNA refuses a malformed xn-- label only when decoding it
    except httpx.InvalidURL as exc:
        raise _invalid(f"url: {exc}") from None
    except UnicodeError:
        raise _invalid("url: the host is not a valid internationalized domain name") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise _invalid("url: an http or https URL with a host")
    if parsed.userinfo:
        raise _invalid(
            "url: no user name or password; credentials in a stored URL leak into logs and "
            "the console (deliveries are signed with the secret instead)"
        )
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise _invalid("url: the port must be 1 to 65535")
    if not _host(parsed.raw_host.decode("ascii", "replace")):
        raise _invalid("url: the host must be a host name or an IP address")
    return str(parsed)


def _host(host: str) -> bool:
    """Whether `host` (as httpx keeps it: ASCII, IPv6 without brackets) names a host."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    labels = host.removesuffix(".").split(".")  # the root's dot, `example.com.`, may end it
    if labels[-1].isdigit() or labels[-1].lower().startswith("0x"):
        # Not a name (no top-level domain is numeric): an IPv4 address, written in full.
        # `1.2.3.4.5`, `1.2.3`, `123` and `0x7f.0.0.1` were taken, and never delivered to.
        try:
            return str(ipaddress.IPv4Address(host)) == host
        except ValueError:
            return False
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def checked_events(events: Any) -> dict[str, list[str]]:
    """Entity types that exist and, for each, commands it has (its timer's name included),
    or "*"; else INVALID_INPUT."""
    types = catalog.entity_types()
    if not isinstance(events, dict) or not events:
        raise _invalid('events: an object of entity types, {"account": ["deposit"]}')
    checked: dict[str, list[str]] = {}
    for entity_type, commands in events.items():
        entity = types.get(entity_type)
        if entity is None:
            raise _invalid(f"events: no entity type {entity_type!r}")
        if (
            not isinstance(commands, list)
            or not commands
            or len(commands) > MAX_COMMANDS
            or not all(isinstance(command, str) for command in commands)
        ):
            raise _invalid(f'events.{entity_type}: 1 to {MAX_COMMANDS} command names, or ["*"]')
        known = {*entity.commands, entity.timer_name, ALL_COMMANDS}
        unknown = sorted(set(commands) - known)
        if unknown:
            raise _invalid(f"events.{entity_type}: {entity_type} has no {', '.join(unknown)}")
        checked[entity_type] = sorted(set(commands))
    return checked


def checked_secret(secret: str | None) -> str:
    if secret is None:
        return new_secret()
    if len(secret) > MAX_SECRET_CHARS:
        raise _invalid(f"secret: at most {MAX_SECRET_CHARS} characters")
    try:
        signing_key(secret)
    except ValueError:
        raise _invalid("secret: whsec_ and the base64 of at least 16 bytes") from None
    if len(secret.removeprefix("whsec_")) % 4:
        # Tenure would sign with it, but the Standard Webhooks libraries a receiver verifies
        # with refuse to load it (`Incorrect padding`): no delivery could be verified.
        raise _invalid("secret: its base64 must be padded with '=' to a multiple of 4")
    return secret


async def _dead_letter_count(subscribers: WebhookSubscribers, subscriber_id: str) -> int:
    count: int = await subscribers.client.xlen(subscribers.key(subscriber_id, "dead"))
    return count


@strawberry.type
class WebhookQuery:
    @bounded(MAX_SUBSCRIBERS, description="Every outbound webhook subscriber (admins only).")
    async def webhook_subscribers(self, info: Info) -> list[WebhookSubscriber] | None:
        subscribers = _subscribers(info)
        async with _redis():
            return [
                WebhookSubscriber.of(s, await _dead_letter_count(subscribers, s.id))
                for s in await subscribers.all()
            ]

    @strawberry.field(description="A subscriber's dead letters, oldest first (admins only).")
    async def webhook_dead_letters(
        self,
        info: Info,
        subscriber_id: strawberry.ID,
        first: Annotated[
            int, strawberry.argument(description=f"1 to {MAX_DEAD_LETTER_PAGE}; 20 when not given.")
        ] = 20,
        after: Annotated[
            str | None,
            strawberry.argument(
                description="A page's last dead letter's id: the page after it. The oldest "
                "first when not given."
            ),
        ] = None,
    ) -> WebhookDeadLetterPage | None:
        subscribers = _subscribers(info)
        if not 1 <= first <= MAX_DEAD_LETTER_PAGE:
            raise _invalid(f"first: 1 to {MAX_DEAD_LETTER_PAGE}")
        if after is not None and not _entry_id(after):
            raise _invalid("after: a dead letter's id")
        async with _redis():
            if await subscribers.get(_checked_id(subscriber_id)) is None:
                raise TenureError(ErrorCode.NOT_FOUND, "no such webhook subscriber")
            letters, more = await subscribers.dead_letters(subscriber_id, first, after)
        return WebhookDeadLetterPage(
            entries=[WebhookDeadLetter.of(letter) for letter in letters],
            has_more=more,
            end_cursor=letters[-1].id if letters else None,
        )


@strawberry.type
class WebhookMutation:
    @strawberry.mutation(
        description="Post every change of the named entity types and commands to `url`, "
        "signed as Standard Webhooks says with `secret` (whsec_ and base64; generated when "
        "not given, and shown only in answers to this registration), from the changes made "
        "from now on."
    )
    async def register_webhook_subscriber(
        self,
        info: Info,
        url: str,
        events: JSON,
        secret: str | None = None,
        idempotency_key: Annotated[
            str | None,
            strawberry.argument(
                description="The registration's id: sent again by the same caller (a retry "
                "after a timeout, say), it is answered with the subscriber it registered, "
                "secret and all, not registered again; with another url, events or secret, "
                "IDEMPOTENCY_KEY_REUSED. 1 to 128 printable ASCII characters, no spaces."
            ),
        ] = None,
    ) -> RegisteredWebhookSubscriber | None:
        subscribers = _subscribers(info)
        principal = info.context.principal
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        subscriber = Subscriber(
            id=f"wh_{uuid.uuid4().hex[:16]}",
            url=checked_url(url),
            secret=checked_secret(secret),
            events=checked_events(events),
            created_at=datetime.now(UTC),
            created_by=principal.sender,
            key=idempotency_key,
        )
        async with _redis():
            registered = await subscribers.add(subscriber)
        if registered is None:
            raise TenureError(
                ErrorCode.LIMIT_REACHED, f"at most {MAX_SUBSCRIBERS} webhook subscribers"
            )
        again = registered.id != subscriber.id
        if again:
            asked_secret = subscriber.secret if secret is not None else registered.secret
            asked = (subscriber.url, subscriber.events, asked_secret)
            if asked != (registered.url, registered.events, registered.secret):
                raise TenureError(
                    ErrorCode.IDEMPOTENCY_KEY_REUSED,
                    f"idempotencyKey {idempotency_key!r} registered subscriber "
                    f"{registered.id} with another url, events or secret",
                )
            subscriber = registered  # its delivery may not have started: started below
        try:
            await info.context.gateway.start_workflow(
                WEBHOOK_WORKFLOW,
                WebhookDeliveryInput(subscriber_id=subscriber.id),
                webhook_workflow_id(subscriber.id),
            )
        except TenureError:
            if not again:  # a registration sent again leaves the first's subscriber be
                async with _redis():
                    await subscribers.remove(subscriber.id)
            raise
        return RegisteredWebhookSubscriber(
            subscriber=WebhookSubscriber.of(subscriber, 0), secret=subscriber.secret
        )

    @strawberry.mutation(
        description="Stop posting to a subscriber and forget it and its dead letters."
    )
    async def remove_webhook_subscriber(
        self, info: Info, id: strawberry.ID
    ) -> strawberry.ID | None:
        subscribers = _subscribers(info)
        async with _redis():
            if not await subscribers.remove(_checked_id(id)):
                raise TenureError(ErrorCode.NOT_FOUND, "no such webhook subscriber")
        return id  # its delivery workflow sees it gone and ends

    @strawberry.mutation(
        description="Send a dead letter again, with its webhook-id; it is dead-lettered "
        "again if its retries run out again."
    )
    async def replay_webhook_dead_letter(
        self, info: Info, subscriber_id: strawberry.ID, id: strawberry.ID
    ) -> int | None:
        subscribers = _subscribers(info)
        if not _entry_id(id):
            raise TenureError(ErrorCode.NOT_FOUND, "no such dead letter")
        async with _redis():
            replayed = await subscribers.replay(_checked_id(subscriber_id), id)
        if not replayed:
            raise TenureError(ErrorCode.NOT_FOUND, "no such dead letter")
        return replayed

    @strawberry.mutation(
        description="Send a subscriber's dead letters again, oldest first, up to 1,000; how many."
    )
    async def replay_webhook_dead_letters(
        self, info: Info, subscriber_id: strawberry.ID
    ) -> int | None:
        subscribers = _subscribers(info)
        async with _redis():
            if await subscribers.get(_checked_id(subscriber_id)) is None:
                raise TenureError(ErrorCode.NOT_FOUND, "no such webhook subscriber")
            return await subscribers.replay(subscriber_id, None)

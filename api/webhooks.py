"""Inbound webhooks: a provider's signed event, verified, becomes one entity command.

`POST /webhooks/<source>` takes the events of one configured source (`Settings.webhook_sources`,
from TENURE_WEBHOOK_SOURCES). Its signature is the credential, so no bearer token is asked
for and the GraphQL rate limits do not apply. In the order a delivery meets them:

- a source not configured: 404 NOT_FOUND, its body unread;
- a body over the source's `max_body_bytes`: 413 PAYLOAD_TOO_LARGE, unread past the limit;
- a signature missing, malformed or not made with the source's secret, or a timestamp
  further than `tolerance_seconds` from now (a replay): 401 UNAUTHENTICATED;
- a body that is not a JSON object, with no event type or id, without a value the mapping
  names, or whose payload the command refuses: 400 INVALID_INPUT;
- an event type the source does not map: 202, logged and ignored (the provider need not send
  it again);
- else the command is sent without waiting: 200 `{"commandId", "status": "ACCEPTED"}` once
  Temporal has durably accepted it. The entity to which it goes does not exist: 404
  NOT_FOUND; has closed: 409 INVALID_TRANSITION; Temporal does not answer: 503 UNAVAILABLE.

Providers send again whatever was not answered 2xx. The event's id is the command's
idempotency key (`webhook:<source>:<event id>`), so a delivery sent again is applied once.
The command's outcome (an entity may still refuse it, say a deposit to a suspended account)
is in the entity's history, sent by `service:webhook:<source>`.

Signatures are checked here with `hmac` rather than the `standardwebhooks` package (which
the tests use to sign as a provider does): its `verify` fixes the tolerance at 5 minutes, and
a malformed header raises other errors than its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from functools import partial
from typing import Any, Protocol

import structlog
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.common import CREATE_GUARDS
from api.errors import RequestRefused
from api.gateway import EntityGateway
from api.limits import BodyLimit, decode_json
from api.metrics import ApiMetrics
from api.request_context import ObservedRequests, note_operation, note_outcome
from entities import catalog
from entities.errors import ErrorCode, Rejected, TenureError
from entities.runtime.policy import webhook_sender
from workers.settings import WebhookEvent, WebhookSource

log = structlog.stdlib.get_logger("api.webhooks")

OPERATION = "webhook"
"""The operation webhook requests are counted under in the API's metrics."""

_KEY = re.compile(r"[\x21-\x7e]{1,128}")  # the gateway's idempotency keys
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

_STATUS = {
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_TRANSITION: 409,  # an ended entity's too (a repeat the gateway answers)
    ErrorCode.LIMIT_REACHED: 409,
    ErrorCode.UNAVAILABLE: 503,
}


class Refused(Exception):
    """A delivery answered with an error status and a code; `before_sending` when no
    command was sent (it counts as a refusal in the API's metrics)."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, *, before_sending: bool = True
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.before_sending = before_sending

    def response(self) -> JSONResponse:
        note_outcome(self.code, refused=self.before_sending)
        body = {"errors": [{"message": self.message, "extensions": {"code": self.code.value}}]}
        return JSONResponse(body, status_code=self.status)


def _unauthenticated(message: str) -> Refused:
    return Refused(401, ErrorCode.UNAUTHENTICATED, message)


def _malformed(message: str) -> Refused:
    return Refused(400, ErrorCode.INVALID_INPUT, message)


# -- signatures -------------------------------------------------------------------------------


def _check_timestamp(timestamp: str, tolerance: int, now: float) -> None:
    if abs(now - int(timestamp)) > tolerance:
        raise _unauthenticated(
            f"the delivery's timestamp is more than {tolerance} seconds from now"
        )


class Scheme(Protocol):
    """How a provider signs its deliveries and names its events."""

    def verify(self, key: bytes, headers: Headers, body: bytes, tolerance: int, now: float) -> None:
        """Raise 401 unless `body` was signed with `key` within `tolerance` of `now`."""

    def event_id(self, headers: Headers, event: dict[str, Any]) -> object:
        """The event's id, as the provider sends it again with each retry."""


class StandardWebhooks:
    """https://www.standardwebhooks.com: `webhook-signature` holds space-separated
    `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`."""

    def verify(self, key: bytes, headers: Headers, body: bytes, tolerance: int, now: float) -> None:
        msg_id, timestamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and timestamp and signatures):
            raise _unauthenticated("webhook-id, webhook-timestamp and webhook-signature are needed")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise _unauthenticated("webhook-timestamp is not a Unix time in seconds")
        signed = f"{msg_id}.{timestamp}.".encode("latin-1") + body
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        if not any(hmac.compare_digest(expected, given) for given in _v1_signatures(signatures)):
            raise _unauthenticated("no signature matches")
        _check_timestamp(timestamp, tolerance, now)

    def event_id(self, headers: Headers, event: dict[str, Any]) -> object:
        return headers["webhook-id"]


def _v1_signatures(header: str) -> list[bytes]:
    found = []
    for versioned in header.split(" "):
        version, _, signature = versioned.partition(",")
        if version == "v1":
            try:
                found.append(base64.b64decode(signature, validate=True))
            # A header's bytes come as latin-1 text: one past ASCII is a ValueError.
            except (binascii.Error, ValueError):
                continue
    return found


class StripeSignature:
    """Stripe's scheme: `Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
    "{t}.{body}">`, with as many `v1` entries as the endpoint has secrets; the event's id is
    the body's `id`."""

    def verify(self, key: bytes, headers: Headers, body: bytes, tolerance: int, now: float) -> None:
        header = headers.get("stripe-signature")
        if not header:
            raise _unauthenticated("Stripe-Signature is needed")
        items = [item.strip().partition("=") for item in header.split(",")]
        timestamps = [value for name, _, value in items if name == "t"]
        if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
            raise _unauthenticated("Stripe-Signature has no single t=<Unix time in seconds>")
        timestamp = timestamps[0]
        expected = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        if not any(
            hmac.compare_digest(expected, value)
            for name, _, value in items
            if name == "v1" and _HEX_SHA256.fullmatch(value)
        ):
            raise _unauthenticated("no signature matches")
        _check_timestamp(timestamp, tolerance, now)

    def event_id(self, headers: Headers, event: dict[str, Any]) -> object:
        return event.get("id")


SCHEMES: dict[str, Scheme] = {"standard": StandardWebhooks(), "stripe": StripeSignature()}


# -- events as commands -----------------------------------------------------------------------


def idempotency_key(source: str, event_id: str) -> str:
    """The command id of a source's event: `webhook:<source>:<event id>`, or, when that is
    no idempotency key (over 128 characters, or not printable ASCII), the event id's SHA-256
    after `#`, which no plain key of the source has in that place."""
    key = f"webhook:{source}:{event_id}"
    if _KEY.fullmatch(key):
        return key
    return f"webhook:{source}#{hashlib.sha256(event_id.encode()).hexdigest()}"


def value_at(event: dict[str, Any], path: str) -> Any:
    """The value at a dotted path into the event; 400 when there is none."""
    value: Any = event
    for name in path.split("."):
        if not isinstance(value, dict) or name not in value:
            raise _malformed(f"the event has no {path}")
        value = value[name]
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _malformed(f"the event's {what} is not a non-empty string")
    return value


def check_mappings(sources: Mapping[str, WebhookSource]) -> None:
    """Refuse at start a mapping that names a command no entity has, one only Tenure's own
    workflows send, payload keys the command does not take, or a command its entity's
    policy does not name (which no one may send)."""
    types = catalog.entity_types()
    for name, source in sources.items():
        for event_type, event in source.events.items():
            where = f"webhook source {name!r}, event {event_type!r}"
            entity = types.get(event.entity)
            if entity is None:
                raise ValueError(f"{where}: no entity type {event.entity!r}")
            try:
                command = entity.spec(event.command)
            except Rejected:
                raise ValueError(
                    f"{where}: {event.entity} has no command {event.command!r}"
                ) from None
            if command.internal:
                # A provider's event mapped to `completeCheckout` checked a cart out with no
                # checkout: these are the checkout saga's, sent by no client nor in bulk.
                raise ValueError(
                    f"{where}: {event.entity} {event.command} is sent by Tenure's own "
                    "workflows (the checkout saga), never by a webhook"
                )
            model = command.model
            unknown = set(event.payload) - set(model.model_fields)
            if unknown:
                raise ValueError(f"{where}: {event.command} takes no {sorted(unknown)}")
            if event.command not in entity.policy.actions:
                # Deny by default, here too: a command no policy names is for no one.
                raise ValueError(f"{where}: {event.entity}'s policy does not name {event.command}")


class Webhooks:
    """The `/webhooks/{source}` endpoint: each source's deliveries within its body limit,
    verified, and sent as commands through the gateway of the request's app."""

    def __init__(self, sources: Mapping[str, WebhookSource]) -> None:
        check_mappings(sources)
        self._endpoints: dict[str, ASGIApp] = {
            name: BodyLimit(partial(self._deliver, name, source), source.max_body_bytes)
            for name, source in sources.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        note_operation(OPERATION)
        name = scope["path_params"]["source"]
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            refused = Refused(404, ErrorCode.NOT_FOUND, "no such webhook source")
            await refused.response()(scope, receive, send)
            return
        await endpoint(scope, receive, send)

    async def _deliver(
        self, name: str, source: WebhookSource, scope: Scope, receive: Receive, send: Send
    ) -> None:
        request = Request(scope, receive)
        try:
            response = await self._answer(name, source, request)
        except Refused as refused:
            # The provider will send it again: worth an operator's eye.
            log.warning("webhook refused", source=name, code=refused.code, reason=refused.message)
            response = refused.response()
        await response(scope, receive, send)

    async def _answer(self, name: str, source: WebhookSource, request: Request) -> JSONResponse:
        body = await request.body()  # BodyLimit stops it past the limit
        scheme = SCHEMES[source.scheme]
        scheme.verify(
            source.signing_key(), request.headers, body, source.tolerance_seconds, time.time()
        )
        try:
            event = decode_json(body)
        except RequestRefused:
            event = None
        if not isinstance(event, dict):
            raise _malformed("the body is not a JSON object")
        event_id = _text(scheme.event_id(request.headers, event), "id")
        event_type = _text(event.get("type"), "type")
        structlog.contextvars.bind_contextvars(
            webhook_source=name, event_id=event_id, event_type=event_type
        )
        mapping = source.events.get(event_type)
        if mapping is None:
            log.info("webhook event ignored: its type is not mapped to a command")
            return JSONResponse({"status": "IGNORED"}, status_code=202)
        command_id = await self._send(
            name, mapping, event, idempotency_key(name, event_id), request
        )
        log.info("webhook event accepted")
        return JSONResponse({"commandId": command_id, "status": "ACCEPTED"})

    async def _send(
        self,
        name: str,
        mapping: WebhookEvent,
        event: dict[str, Any],
        key: str,
        request: Request,
    ) -> str:
        entity_id = _text(value_at(event, mapping.entity_id), mapping.entity_id)
        payload = {field: value_at(event, path) for field, path in mapping.payload.items()}
        structlog.contextvars.bind_contextvars(
            entity=f"{mapping.entity}:{entity_id}", command=mapping.command
        )
        gateway: EntityGateway = request.app.state.gateway
        guard = CREATE_GUARDS.get((mapping.entity, mapping.command))
        sender = webhook_sender(name)
        try:
            if guard is not None:
                await guard(gateway, entity_id, payload)
            receipt = await gateway.send(
                mapping.entity,
                entity_id,
                mapping.command,
                payload,
                idempotency_key=key,
                wait=False,  # answered once Temporal has durably accepted it
                sent_by=sender,
            )
        except TenureError as exc:
            status = _STATUS.get(exc.code)
            if status is None:
                log.error("webhook command failed", code=exc.code, reason=exc.message)
                status = 500
            before_sending = exc.code is ErrorCode.INVALID_INPUT  # the payload, refused
            raise Refused(status, exc.code, exc.message, before_sending=before_sending) from exc
        return receipt.command_id


def webhook_endpoint(sources: Mapping[str, WebhookSource], metrics: ApiMetrics) -> ASGIApp:
    """`/webhooks/{source}`, each request counted and timed as a `webhook` operation."""
    return ObservedRequests(Webhooks(sources), metrics)

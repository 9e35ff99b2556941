"""The one settings object, built from the environment at each entry point."""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from entities.runtime.envelope import RuntimeOptions

PositiveRate = Annotated[float, Field(gt=0)]
"""Requests a second a rate limit refills: none would lock its callers out for good."""
Burst = Annotated[int, Field(ge=1)]
"""Requests a rate limit lets through at once: none would limit nothing."""

WebhookSourceName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
"""A webhook source's name, the last segment of its URL: `/webhooks/<name>`."""

JsonPath = Annotated[str, StringConstraints(pattern=r"^[^.]+(\.[^.]+)*$", max_length=200)]
"""Dotted keys into a JSON object: `data.account_id`."""

MIN_WEBHOOK_KEY_BYTES = 16


class WebhookEvent(BaseModel, extra="forbid"):
    """One event type of a webhook source as an entity command: where in the event's JSON
    the entity's id and each key of the command's payload are."""

    entity: str = Field(description="The entity type, e.g. account.")
    command: str = Field(description="The command as the entity declares it, e.g. deposit.")
    entity_id: JsonPath = Field(description="Where the entity's id is, e.g. data.account_id.")
    payload: dict[str, JsonPath] = Field(
        default_factory=dict, description="Each payload key and where its value is."
    )


class WebhookSource(BaseModel, extra="forbid"):
    """A provider that posts signed events to `/webhooks/<name>`: how it signs them, with
    what secret, and which of its event types become which commands."""

    scheme: Literal["standard", "stripe"] = Field(
        description="standard: Standard Webhooks (webhook-id, webhook-timestamp, "
        "webhook-signature); stripe: a Stripe-Signature header."
    )
    secret: SecretStr = Field(
        description="standard: whsec_ and the base64 key; stripe: the endpoint's secret as is."
    )
    tolerance_seconds: int = Field(
        default=300, ge=1, description="How far a delivery's timestamp may be from now."
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="Request body size.")
    events: dict[str, WebhookEvent] = Field(
        default_factory=dict, description="Event types mapped to commands; others are ignored."
    )

    @model_validator(mode="after")
    def _secret_fits_scheme(self) -> Self:
        self.signing_key()
        return self

    def signing_key(self) -> bytes:
        """The HMAC key: a Standard Webhooks secret is `whsec_` and the key in base64 (its
        padding optional); Stripe signs with the whole secret string."""
        secret = self.secret.get_secret_value()
        if self.scheme == "stripe":
            key = secret.encode()
        else:
            malformed = ValueError("a standard webhook secret is whsec_ and base64")
            if not secret.startswith("whsec_"):
                raise malformed
            encoded = secret.removeprefix("whsec_")
            try:
                key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
            except binascii.Error:
                raise malformed from None
        if len(key) < MIN_WEBHOOK_KEY_BYTES:
            raise ValueError(f"a webhook secret is at least {MIN_WEBHOOK_KEY_BYTES} bytes")
        return key

    def as_config(self) -> dict[str, Any]:
        """This source as TENURE_WEBHOOK_SOURCES gives it, the secret included."""
        return {**self.model_dump(mode="json"), "secret": self.secret.get_secret_value()}


# Errors never quote the input: it holds the secrets.
_WEBHOOK_SOURCES = TypeAdapter(
    dict[WebhookSourceName, WebhookSource], config=ConfigDict(hide_input_in_errors=True)
)


class SettingsError(ValueError):
    """A setting a process cannot start with, said in a line naming its variable, never its
    value (it may be a secret)."""


_RUNTIME_VARIABLES = {
    "TENURE_MAX_COMMANDS_PER_RUN": "max_commands_per_run",
    "TENURE_LEDGER_SIZE": "ledger_size",
    "TENURE_MAX_COMMANDS_PER_TASK": "max_commands_per_task",
    "TENURE_MAX_STATE_BYTES": "max_state_bytes",
    "TENURE_PUBLISH_INTERVAL": "publish_interval_seconds",
}
_JSON_VARIABLES = {
    "TENURE_RATE_LIMITS": "rate_limits",
    "TENURE_ENTITY_OPTIONS": "entity_options",
}


def _said(exc: ValidationError, prefix: str = "", names: Mapping[str, str] | None = None) -> str:
    """What was wrong, in one line: each place by the variable that set it, where known."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(part) for part in error["loc"])
        for field, var in (names or {}).items():
            if where == field or where.startswith(field + "."):
                where = var + where[len(field) :]
                break
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    said = "; ".join(parts)
    return f"{prefix}: {said}" if prefix else said


def settings_or_exit(process: str, status: int = 2) -> Settings:
    """The process's settings from its environment; one line on stderr and exit `status`
    when it cannot start with them."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"{process}: {exc}", file=sys.stderr)
        sys.exit(status)


MIN_SECRET_BYTES = 32
"""The shortest TENURE_AUTH_SECRET taken (RFC 7518: an HS256 key at least as long as the
hash); the API refuses to start with a shorter one, and `tenure token` to sign with it."""


class Settings(BaseModel):
    """Where Tenure's parts live and how they behave. `from_env` reads TEMPORAL_ADDRESS,
    REDIS_URL and the TENURE_* variables; nothing reads the environment at import time."""

    temporal_address: str | None = None
    temporal_namespace: str = "default"
    task_queue: str = "tenure"
    redis_url: str | None = None
    redis_prefix: str = "tenure:"
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description=(
            "The API's Prometheus /metrics on a port of its own, at api_host (the API's port "
            "then answers 404 there); 0: at /metrics on the API's port."
        ),
    )
    api_shutdown_grace: float = Field(
        default=20.0, ge=0, description="Seconds the API gives requests in flight on SIGTERM."
    )
    api_keep_alive: float = Field(
        default=75.0,
        ge=1,
        description="Seconds the API keeps an idle HTTP connection open: longer than a "
        "proxy's own upstream keep-alive (nginx and most load balancers: 60 s), so a proxy "
        "never sends a request on a connection the API is closing.",
    )
    worker_health_host: str = Field(
        default="127.0.0.1", description="Where the worker serves its health (0.0.0.0 in pods)."
    )
    worker_health_port: int = Field(
        default=8081, ge=0, le=65535, description="The worker's /livez and /readyz; 0: not served."
    )
    worker_metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="The worker's Prometheus /metrics; 0: not served."
    )
    log_format: Literal["json", "text"] | None = Field(
        default=None, description="json or text; None: text in development, json otherwise."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug, info, warning or error; debug: a line per request."
    )
    redis_cluster: bool = Field(
        default=False, description="REDIS_URL names a node of a Redis Cluster."
    )
    redis_sentinels: list[str] = Field(
        default_factory=list,
        description="host:port of Redis Sentinels; with redis_sentinel_master, the cache "
        "follows the master they name (REDIS_URL is then not needed).",
    )
    redis_sentinel_master: str | None = Field(
        default=None, description="The name the Sentinels monitor the master under."
    )
    worker_shutdown_grace: float = Field(
        default=20.0, ge=0, description="Seconds the worker gives running activities on SIGTERM."
    )
    data_dir: Path = Path(".data")
    live_read_timeout: float = Field(default=2.0, gt=0)
    command_wait_timeout: float = Field(default=10.0, gt=0)
    entity_history_limit_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Commands to an entity whose current run's history is past this many "
        "bytes are refused UNAVAILABLE (nothing stored) until it catches up and continues "
        "as new: a healthy run continues as new near 4 MiB, when Temporal suggests it, and "
        "Temporal terminates a run at 50 MiB.",
    )
    redis_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Seconds a Redis command may take, and may wait for a free connection.",
    )
    redis_max_connections: int = Field(
        default=64,
        ge=1,
        description="Connections per Redis; past them, commands wait. On a cluster, the "
        "commands and pipelines in flight at once across its nodes.",
    )
    rendered_reads: int = Field(
        default=4096, ge=0, description="Rendered CACHED-read responses the API keeps; 0: none."
    )
    runtime: RuntimeOptions = Field(default_factory=RuntimeOptions)
    change_stream_maxlen: int = Field(
        default=1_000_000,
        ge=1,
        description="Entries each entity type's change stream keeps, about (MAXLEN ~).",
    )
    change_stream_max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Bytes of entries each entity type's change stream keeps, about: by the "
        "entries' sizes (`workers.changes.kept_length`), never fewer than 100 entries.",
    )
    change_stream_max_age_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a change stream's entries are kept, about (MINID ~); None: "
        "only the length bounds them.",
    )
    ended_retention_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Seconds an ended entity (a closed account, a checked-out or discarded "
        "cart) stays in Redis, its snapshot, listing entries and change-stream mark, after "
        "it ended (workers/forgetting.py), an hour at least; None: as long as Temporal keeps its "
        "closed workflow (the namespace's retention); 0: for good.",
    )
    entity_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    max_cached_workflows: int = Field(default=10_000, ge=0)
    max_concurrent_workflow_tasks: int = Field(
        default=100, ge=2, description="Workflow tasks a worker runs at once (the SDK's least: 2)."
    )
    sticky_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a workflow task waits on its entity's worker before any worker "
        "may take it (and replay the entity to run it).",
    )
    workflow_sandbox: bool = True
    environment: Literal["development", "production"] = Field(
        default="production",
        description="development allows running without a key source (every caller is then "
        "an admin), with a loud warning; production refuses to.",
    )
    auth_secret: str | None = Field(default=None, description="An HS256 signing secret.")
    auth_public_key_file: Path | None = Field(
        default=None, description="A PEM public key (RS256 or ES256) that signs tokens."
    )
    auth_jwks_url: str | None = Field(
        default=None, description="An identity provider's JWKS URL (RS256 or ES256 keys)."
    )
    auth_issuer: str = "tenure"
    auth_audience: str = "tenure-api"
    auth_leeway: float = Field(default=30.0, ge=0, description="Clock leeway, seconds.")
    auth_roles_claim: str = "roles"
    auth_accounts_claim: str = "accounts"
    auth_scopes_claim: str = "scope"
    watchdog_interval: float = Field(
        default=10.0, ge=0, description="Seconds between looks for stuck entities; 0: none."
    )
    auto_repair: bool = Field(
        default=True,
        description="Repair at once an entity stuck because its history no longer replays.",
    )
    # request limits
    max_query_depth: int = Field(default=8, ge=1, description="Fields nested deeper: refused.")
    max_aliases: int = Field(default=15, ge=0, description="Aliases an operation may use.")
    max_tokens: int = Field(default=1000, ge=1, description="Tokens in a document, comments too.")
    max_directives: int = Field(default=50, ge=0, description="Directives an operation may use.")
    max_root_fields: int = Field(default=20, ge=1, description="Root fields of an operation.")
    max_document_chars: int = Field(
        default=16 * 1024,
        ge=256,
        description="Characters in a document; each is read one by one in Python.",
    )
    max_fields: int = Field(
        default=200, ge=1, description="Fields an operation selects, all the way down."
    )
    max_object_repeats: int = Field(
        default=3,
        ge=1,
        description="Times one field with a selection set of its own may be selected in one "
        "selection set.",
    )
    max_field_repeats: int = Field(
        default=20, ge=1, description="Times one field may be selected in one selection set."
    )
    max_live_reads: int = Field(default=5, ge=0, description="LIVE reads a request may make.")
    max_mutations: int = Field(default=10, ge=1, description="Mutations a request may send.")
    max_response_values: int = Field(
        default=5000,
        ge=100,
        description="Values an answer may hold, every list counted full (api/response_size.py).",
    )
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="Request body size.")
    max_subscribers: int = Field(
        default=10_000, ge=1, description="Live subscriptions one API process serves at once."
    )
    max_subscriptions_per_connection: int = Field(
        default=20, ge=1, description="Live subscriptions one WebSocket may hold at once."
    )
    max_subscriptions_per_customer: int = Field(
        default=100,
        ge=1,
        description="Live subscriptions one customer may hold at once in one API process, "
        "over every connection: one customer could otherwise take every subscriber slot.",
    )
    max_carts_per_account: int = Field(
        default=100,
        ge=1,
        description="Carts not checked out (open, checking out or abandoned) an account may "
        "have when a new one is created, as the listing index counts them.",
    )
    shop_currency: str | None = Field(
        default=None,
        description="The ISO 4217 currency inventory prices are in: a cart may be made only "
        "for an account in it (a JPY account paid a 15.00 EUR item as 1,500 yen). Unset, "
        "any account's cart pays prices as its own currency's minor units; `make dev`, the "
        "compose file and the Kubernetes manifests set EUR.",
    )
    max_connections_per_customer: int = Field(
        default=10,
        ge=1,
        description="WebSockets one customer may hold open at once in one API process.",
    )
    graphiql: bool | None = Field(default=None, description="Serve GraphiQL; None: in development.")
    introspection: bool | None = Field(
        default=None, description="Answer introspection; None: in development."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the API from."
    )
    # rate limits
    rate_limits: dict[str, tuple[PositiveRate, Burst]] = Field(
        default_factory=lambda: {"customer": (20.0, 40), "service": (500.0, 1000)},
        description="Per role: requests per second and burst, each caller a bucket of its "
        "own; a role not named (admin, by default) is not limited.",
    )
    rate_limit_values_per_point: int = Field(
        default=100,
        ge=0,
        description="A request costs one token more of its caller's rate limit for each so "
        "many values its answer could hold (api/rate_limits.py); 0: every request costs one.",
    )
    webhook_sources: dict[WebhookSourceName, WebhookSource] = Field(
        default_factory=dict,
        description="Providers that post signed events to /webhooks/<name>, by name.",
    )
    webhook_retry_for_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description="How long an outbound webhook is retried before it is dead-lettered.",
    )
    webhook_backoff_seconds: float = Field(
        default=1.0,
        gt=0,
        description="The first wait before an outbound webhook is sent again; doubled each "
        "time, up to an hour.",
    )

    @property
    def bulk_task_queue(self) -> str:
        """The task queue of bulk commands and their activities: their own, so that a bulk
        command's next page never waits behind the entity tasks its last page caused."""
        return f"{self.task_queue}-bulk"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("shop_currency")
    @classmethod
    def _a_currency(cls, code: str | None) -> str | None:
        from entities.account import ISO_4217

        if code is not None and code not in ISO_4217:
            raise ValueError(f"{code!r} is not an ISO 4217 currency code, such as EUR")
        return code

    @field_validator("ended_retention_seconds")
    @classmethod
    def _an_hour_at_least(cls, seconds: float | None) -> float | None:
        # Within an hour of its end an entity may still publish (workers/forgetting.py).
        if seconds and seconds < 3600:
            raise ValueError("0 (for good) or at least 3600 (an hour)")
        return seconds

    @field_validator("entity_options")
    @classmethod
    def _options_entities_can_start_with(
        cls, options: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Each entity type's options as its entities will read them: an option no entity
        could start with (a negative period, say) stranded every new entity of the type,
        its first workflow task failing for good, and a misspelt one was ignored."""
        if not options:
            return options
        from entities import catalog

        types = catalog.entity_types()
        for name, given in options.items():
            if name not in types:
                raise ValueError(f"no entity type {name!r}: one of {', '.join(sorted(types))}")
            model = types[name].options_model
            unknown = sorted(set(given) - set(model.model_fields))
            if unknown:
                raise ValueError(f"{name}: no option {', '.join(map(repr, unknown))}")
            try:
                model.model_validate(given)
            except ValidationError as exc:
                raise ValueError(_said(exc, name)) from None
        return options

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        plain = {
            "TEMPORAL_ADDRESS": "temporal_address",
            "TEMPORAL_NAMESPACE": "temporal_namespace",
            "TENURE_TASK_QUEUE": "task_queue",
            "REDIS_URL": "redis_url",
            "TENURE_REDIS_PREFIX": "redis_prefix",
            "API_HOST": "api_host",
            "API_PORT": "api_port",
            "TENURE_API_METRICS_PORT": "api_metrics_port",
            "TENURE_API_SHUTDOWN_GRACE": "api_shutdown_grace",
            "TENURE_API_KEEP_ALIVE": "api_keep_alive",
            "TENURE_WORKER_HEALTH_HOST": "worker_health_host",
            "TENURE_WORKER_HEALTH_PORT": "worker_health_port",
            "TENURE_WORKER_SHUTDOWN_GRACE": "worker_shutdown_grace",
            "TENURE_WORKER_METRICS_PORT": "worker_metrics_port",
            "TENURE_LOG_FORMAT": "log_format",
            "TENURE_LOG_LEVEL": "log_level",
            "TENURE_REDIS_CLUSTER": "redis_cluster",
            "TENURE_REDIS_SENTINEL_MASTER": "redis_sentinel_master",
            "TENURE_DATA_DIR": "data_dir",
            "TENURE_LIVE_READ_TIMEOUT": "live_read_timeout",
            "TENURE_COMMAND_WAIT_TIMEOUT": "command_wait_timeout",
            "TENURE_ENTITY_HISTORY_LIMIT_BYTES": "entity_history_limit_bytes",
            "TENURE_MAX_CACHED_WORKFLOWS": "max_cached_workflows",
            "TENURE_MAX_CONCURRENT_WORKFLOW_TASKS": "max_concurrent_workflow_tasks",
            "TENURE_REDIS_TIMEOUT": "redis_timeout",
            "TENURE_REDIS_MAX_CONNECTIONS": "redis_max_connections",
            "TENURE_STICKY_TIMEOUT": "sticky_timeout",
            "TENURE_WORKFLOW_SANDBOX": "workflow_sandbox",
            "TENURE_RENDERED_READS": "rendered_reads",
            "TENURE_WATCHDOG_INTERVAL": "watchdog_interval",
            "TENURE_AUTO_REPAIR": "auto_repair",
            "TENURE_CHANGE_STREAM_MAXLEN": "change_stream_maxlen",
            "TENURE_CHANGE_STREAM_MAX_BYTES": "change_stream_max_bytes",
            "TENURE_CHANGE_STREAM_MAX_AGE_SECONDS": "change_stream_max_age_seconds",
            "TENURE_ENDED_RETENTION_SECONDS": "ended_retention_seconds",
            "TENURE_WEBHOOK_RETRY_FOR_SECONDS": "webhook_retry_for_seconds",
            "TENURE_WEBHOOK_BACKOFF_SECONDS": "webhook_backoff_seconds",
            "TENURE_ENV": "environment",
            "TENURE_AUTH_SECRET": "auth_secret",
            "TENURE_AUTH_PUBLIC_KEY_FILE": "auth_public_key_file",
            "TENURE_AUTH_JWKS_URL": "auth_jwks_url",
            "TENURE_AUTH_ISSUER": "auth_issuer",
            "TENURE_AUTH_AUDIENCE": "auth_audience",
            "TENURE_AUTH_LEEWAY": "auth_leeway",
            "TENURE_AUTH_ROLES_CLAIM": "auth_roles_claim",
            "TENURE_AUTH_ACCOUNTS_CLAIM": "auth_accounts_claim",
            "TENURE_AUTH_SCOPES_CLAIM": "auth_scopes_claim",
            # request limits
            "TENURE_MAX_QUERY_DEPTH": "max_query_depth",
            "TENURE_MAX_ALIASES": "max_aliases",
            "TENURE_MAX_TOKENS": "max_tokens",
            "TENURE_MAX_DIRECTIVES": "max_directives",
            "TENURE_MAX_ROOT_FIELDS": "max_root_fields",
            "TENURE_MAX_FIELDS": "max_fields",
            "TENURE_MAX_DOCUMENT_CHARS": "max_document_chars",
            "TENURE_MAX_FIELD_REPEATS": "max_field_repeats",
            "TENURE_MAX_OBJECT_REPEATS": "max_object_repeats",
            "TENURE_MAX_LIVE_READS": "max_live_reads",
            "TENURE_MAX_MUTATIONS": "max_mutations",
            "TENURE_MAX_RESPONSE_VALUES": "max_response_values",
            "TENURE_RATE_LIMIT_VALUES_PER_POINT": "rate_limit_values_per_point",
            "TENURE_MAX_BODY_BYTES": "max_body_bytes",
            "TENURE_MAX_SUBSCRIBERS": "max_subscribers",
            "TENURE_MAX_SUBSCRIPTIONS_PER_CUSTOMER": "max_subscriptions_per_customer",
            "TENURE_MAX_CONNECTIONS_PER_CUSTOMER": "max_connections_per_customer",
            "TENURE_MAX_CARTS_PER_ACCOUNT": "max_carts_per_account",
            "TENURE_SHOP_CURRENCY": "shop_currency",
            "TENURE_MAX_SUBSCRIPTIONS_PER_CONNECTION": "max_subscriptions_per_connection",
            "TENURE_GRAPHIQL": "graphiql",
            "TENURE_INTROSPECTION": "introspection",
        }
        for var, field in plain.items():
            if env.get(var):
                values[field] = env[var]
        runtime = {field: env[var] for var, field in _RUNTIME_VARIABLES.items() if env.get(var)}
        if runtime:
            values["runtime"] = runtime
        for var, field in _JSON_VARIABLES.items():
            if env.get(var):
                try:
                    values[field] = json.loads(env[var])
                except ValueError as exc:
                    raise SettingsError(f"{var}: not JSON ({exc})") from None
        if env.get("TENURE_WEBHOOK_SOURCES"):
            try:
                values["webhook_sources"] = _WEBHOOK_SOURCES.validate_json(
                    env["TENURE_WEBHOOK_SOURCES"]
                )
            except ValidationError as exc:  # said in a line naming the variable, no secret
                raise SettingsError(_said(exc, "TENURE_WEBHOOK_SOURCES")) from None
        # request limits
        if env.get("TENURE_REDIS_SENTINELS"):
            sentinels = env["TENURE_REDIS_SENTINELS"].split(",")
            values["redis_sentinels"] = [s.strip() for s in sentinels if s.strip()]
        if env.get("TENURE_CORS_ORIGINS"):
            origins = env["TENURE_CORS_ORIGINS"].split(",")
            values["cors_origins"] = [origin.strip() for origin in origins if origin.strip()]
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            names = {field: var for var, field in {**plain, **_JSON_VARIABLES}.items()}
            names |= {f"runtime.{f}": var for var, f in _RUNTIME_VARIABLES.items()}
            names |= {"redis_sentinels": "TENURE_REDIS_SENTINELS"}
            names |= {"cors_origins": "TENURE_CORS_ORIGINS"}
            raise SettingsError(_said(exc, names=names)) from None

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` rebuild these settings in a child process."""
        env = {
            "TEMPORAL_NAMESPACE": self.temporal_namespace,
            "TENURE_TASK_QUEUE": self.task_queue,
            "TENURE_REDIS_PREFIX": self.redis_prefix,
            "API_HOST": self.api_host,
            "API_PORT": str(self.api_port),
            "TENURE_API_METRICS_PORT": str(self.api_metrics_port),
            "TENURE_DATA_DIR": str(self.data_dir),
            "TENURE_LIVE_READ_TIMEOUT": str(self.live_read_timeout),
            "TENURE_API_SHUTDOWN_GRACE": str(self.api_shutdown_grace),
            "TENURE_API_KEEP_ALIVE": str(self.api_keep_alive),
            "TENURE_WORKER_HEALTH_HOST": self.worker_health_host,
            "TENURE_WORKER_HEALTH_PORT": str(self.worker_health_port),
            "TENURE_WORKER_SHUTDOWN_GRACE": str(self.worker_shutdown_grace),
            "TENURE_WORKER_METRICS_PORT": str(self.worker_metrics_port),
            "TENURE_LOG_FORMAT": self.log_format or "",
            "TENURE_LOG_LEVEL": self.log_level,
            "TENURE_REDIS_CLUSTER": "1" if self.redis_cluster else "0",
            "TENURE_COMMAND_WAIT_TIMEOUT": str(self.command_wait_timeout),
            "TENURE_ENTITY_HISTORY_LIMIT_BYTES": str(self.entity_history_limit_bytes),
            "TENURE_MAX_COMMANDS_PER_RUN": str(self.runtime.max_commands_per_run),
            "TENURE_LEDGER_SIZE": str(self.runtime.ledger_size),
            "TENURE_MAX_COMMANDS_PER_TASK": str(self.runtime.max_commands_per_task),
            "TENURE_MAX_STATE_BYTES": str(self.runtime.max_state_bytes),
            "TENURE_PUBLISH_INTERVAL": str(self.runtime.publish_interval_seconds),
            "TENURE_ENTITY_OPTIONS": json.dumps(self.entity_options),
            "TENURE_RATE_LIMITS": json.dumps(self.rate_limits),
            "TENURE_MAX_CACHED_WORKFLOWS": str(self.max_cached_workflows),
            "TENURE_MAX_CONCURRENT_WORKFLOW_TASKS": str(self.max_concurrent_workflow_tasks),
            "TENURE_REDIS_TIMEOUT": str(self.redis_timeout),
            "TENURE_REDIS_MAX_CONNECTIONS": str(self.redis_max_connections),
            "TENURE_STICKY_TIMEOUT": str(self.sticky_timeout),
            "TENURE_WORKFLOW_SANDBOX": "1" if self.workflow_sandbox else "0",
            "TENURE_RENDERED_READS": str(self.rendered_reads),
            "TENURE_WATCHDOG_INTERVAL": str(self.watchdog_interval),
            "TENURE_AUTO_REPAIR": "1" if self.auto_repair else "0",
            "TENURE_CHANGE_STREAM_MAXLEN": str(self.change_stream_maxlen),
            "TENURE_CHANGE_STREAM_MAX_BYTES": str(self.change_stream_max_bytes),
            "TENURE_WEBHOOK_RETRY_FOR_SECONDS": str(self.webhook_retry_for_seconds),
            "TENURE_WEBHOOK_BACKOFF_SECONDS": str(self.webhook_backoff_seconds),
            "TENURE_ENV": self.environment,
            "TENURE_AUTH_ISSUER": self.auth_issuer,
            "TENURE_AUTH_AUDIENCE": self.auth_audience,
            "TENURE_AUTH_LEEWAY": str(self.auth_leeway),
            "TENURE_AUTH_ROLES_CLAIM": self.auth_roles_claim,
            "TENURE_AUTH_ACCOUNTS_CLAIM": self.auth_accounts_claim,
            "TENURE_AUTH_SCOPES_CLAIM": self.auth_scopes_claim,
            # request limits
            "TENURE_MAX_QUERY_DEPTH": str(self.max_query_depth),
            "TENURE_MAX_ALIASES": str(self.max_aliases),
            "TENURE_MAX_TOKENS": str(self.max_tokens),
            "TENURE_MAX_DIRECTIVES": str(self.max_directives),
            "TENURE_MAX_ROOT_FIELDS": str(self.max_root_fields),
            "TENURE_MAX_FIELDS": str(self.max_fields),
            "TENURE_MAX_DOCUMENT_CHARS": str(self.max_document_chars),
            "TENURE_MAX_FIELD_REPEATS": str(self.max_field_repeats),
            "TENURE_MAX_OBJECT_REPEATS": str(self.max_object_repeats),
            "TENURE_MAX_LIVE_READS": str(self.max_live_reads),
            "TENURE_MAX_MUTATIONS": str(self.max_mutations),
            "TENURE_MAX_RESPONSE_VALUES": str(self.max_response_values),
            "TENURE_RATE_LIMIT_VALUES_PER_POINT": str(self.rate_limit_values_per_point),
            "TENURE_MAX_BODY_BYTES": str(self.max_body_bytes),
            "TENURE_MAX_SUBSCRIBERS": str(self.max_subscribers),
            "TENURE_MAX_SUBSCRIPTIONS_PER_CUSTOMER": str(self.max_subscriptions_per_customer),
            "TENURE_MAX_CONNECTIONS_PER_CUSTOMER": str(self.max_connections_per_customer),
            "TENURE_MAX_CARTS_PER_ACCOUNT": str(self.max_carts_per_account),
            "TENURE_MAX_SUBSCRIPTIONS_PER_CONNECTION": str(self.max_subscriptions_per_connection),
            "TENURE_GRAPHIQL": "" if self.graphiql is None else str(int(self.graphiql)),
            "TENURE_INTROSPECTION": ""
            if self.introspection is None
            else str(int(self.introspection)),
            "TENURE_CORS_ORIGINS": ",".join(self.cors_origins),
            "TENURE_ENDED_RETENTION_SECONDS": ""
            if self.ended_retention_seconds is None
            else str(self.ended_retention_seconds),
        }
        optional = {
            "TENURE_SHOP_CURRENCY": self.shop_currency,
            "TENURE_AUTH_SECRET": self.auth_secret,
            "TENURE_AUTH_PUBLIC_KEY_FILE": self.auth_public_key_file,
            "TENURE_AUTH_JWKS_URL": self.auth_jwks_url,
            "TENURE_CHANGE_STREAM_MAX_AGE_SECONDS": self.change_stream_max_age_seconds,
        }
        env.update({name: str(value) for name, value in optional.items() if value})
        if self.temporal_address:
            env["TEMPORAL_ADDRESS"] = self.temporal_address
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        if self.redis_sentinels:
            env["TENURE_REDIS_SENTINELS"] = ",".join(self.redis_sentinels)
        if self.redis_sentinel_master:
            env["TENURE_REDIS_SENTINEL_MASTER"] = self.redis_sentinel_master
        if self.webhook_sources:
            env["TENURE_WEBHOOK_SOURCES"] = json.dumps(
                {name: source.as_config() for name, source in self.webhook_sources.items()}
            )
        return env

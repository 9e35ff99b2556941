"""The API's /metrics as an operator reads it after real requests: each counted by operation
and outcome, refusals by code, cache reads by result, fallbacks and signal batches."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from api.metrics import ApiMetrics, OperationNames
from deploy.embedded import free_port, port_is_free
from tests.api.test_access import token
from tests.api.test_cached_reads import replays_of
from tests.api.test_limits import aliases
from tests.conftest import WorkerFactory, api_client, new_id
from workers.cache import SnapshotCache
from workers.settings import Settings

OPEN = """mutation Open($id: ID!) { openAccount(id: $id, ownerName: "Ada",
  email: "ada@example.com", wait: true) { status } }"""
WITHDRAW = """mutation Withdraw($id: ID!) {
  withdrawFromAccount(id: $id, amount: 5, wait: true) { status } }"""
BALANCE = "query Balance($id: ID!) { account(id: $id) { balance revision } }"
LIVE = "query Live($id: ID!) { account(id: $id, consistency: LIVE) { revision stale } }"


class Scrape:
    """One scrape of /metrics: each sample's value by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and labels.items() <= sample_labels.items()
        )

    def labels(self, name: str, label: str) -> set[str]:
        return {labels[label] for sample, labels, _ in self.samples if sample == name}


async def scrape(http: httpx.AsyncClient) -> Scrape:
    response = await http.get("/metrics")  # no token: Prometheus has none
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


class Caller:
    def __init__(self, http: httpx.AsyncClient, bearer: str | None) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}

    async def __call__(self, query: str, **variables: Any) -> httpx.Response:
        body = {"query": query, "variables": variables}
        return await self.http.post("/graphql", json=body, headers=self.headers)


async def test_requests_are_counted_by_operation_and_outcome_and_refusals_by_code(
    secured_http: httpx.AsyncClient,
) -> None:
    admin = Caller(secured_http, token("admin", "ops"))
    account_id = new_id()

    assert (await admin(OPEN, id=account_id)).json()["data"]["openAccount"]["status"] == "APPLIED"
    rejected = await admin(WITHDRAW, id=account_id)  # a PENDING account pays nothing out
    assert rejected.json()["errors"][0]["extensions"]["code"] == "INVALID_TRANSITION"
    too_many = await admin(aliases(16))
    assert too_many.json()["errors"][0]["extensions"]["code"] == "TOO_MANY_ALIASES"
    anonymous = await Caller(secured_http, None)(BALANCE, id=account_id)
    assert anonymous.status_code == 401
    for _ in range(2):  # executed, then replayed from its rendered response
        assert (await admin(BALANCE, id=account_id)).json()["data"]["account"]["revision"] == 1
    assert replays_of(secured_http).replayed == 1

    metrics = await scrape(secured_http)
    requests = "tenure_api_requests_total"
    assert metrics.value(requests, operation="Open", code="OK") == 1
    assert metrics.value(requests, operation="Withdraw", code="INVALID_TRANSITION") == 1
    assert metrics.value(requests, operation="anonymous", code="TOO_MANY_ALIASES") == 1
    # Refused before its body was read: which operation it was is not known.
    assert metrics.value(requests, operation="unknown", code="UNAUTHENTICATED") == 1
    assert metrics.value(requests, operation="Balance", code="OK") == 2
    assert metrics.value(requests) == 6
    assert metrics.value("tenure_api_request_duration_seconds_count") == 6
    assert metrics.value("tenure_api_request_duration_seconds_count", operation="Balance") == 2
    assert metrics.value("tenure_api_request_duration_seconds_sum") > 0
    # Refused before GraphQL ran anything: the limit and the 401, not the rejection.
    assert metrics.value("tenure_api_refusals_total", code="TOO_MANY_ALIASES") == 1
    assert metrics.value("tenure_api_refusals_total", code="UNAUTHENTICATED") == 1
    assert metrics.value("tenure_api_refusals_total") == 2
    # Both reads came from the cache: the executed one and the replayed one.
    assert metrics.value("tenure_api_cache_reads_total", result="hit") == 2
    assert metrics.labels("tenure_api_cache_reads_total", "result") == {"hit", "miss", "stale"}
    # The withdrawal, waited for, went as an update that Temporal took: no signal (the open
    # started its workflow), no update refused.
    assert metrics.value("tenure_api_signal_batch_size_count") == 0
    assert metrics.value("tenure_api_update_refusals_total") == 0


async def test_stale_reads_misses_and_live_read_fallbacks_are_counted(
    settings: Settings,
    temporal_client: Client,
    run_worker: WorkerFactory,
    cache: SnapshotCache,
) -> None:
    account_id = new_id()
    async with api_client(settings, temporal_client) as http:
        read = Caller(http, None)
        async with run_worker():
            await read(OPEN, id=account_id)
        # No worker now: the entity cannot answer a LIVE read, the cache answers instead.
        live = (await read(LIVE, id=account_id)).json()["data"]["account"]
        assert live == {"revision": 1, "stale": True}
        assert (await read(BALANCE, id=new_id())).json()["data"]["account"] is None
        await cache.mark_stuck("account", account_id, "a test says so")
        assert (await read(BALANCE, id=account_id)).json()["data"]["account"]["revision"] == 1

        metrics = await scrape(http)
    assert metrics.value("tenure_api_live_read_fallbacks_total") == 1
    # The entity never seen: a miss, then asked of a workflow that does not exist.
    assert metrics.value("tenure_api_cache_reads_total", result="miss") == 1
    assert metrics.value("tenure_api_cache_reads_total", result="stale") == 1
    assert metrics.value("tenure_api_cache_reads_total", result="hit") == 0
    assert metrics.value("tenure_api_requests_total", operation="Live", code="OK") == 1


def test_operation_names_stay_few_whatever_clients_send() -> None:
    names = OperationNames(limit=3)
    assert [names(n) for n in ("A", "B", "A", "C", "D", "B")] == ["A", "B", "A", "C", "other", "B"]
    assert names(None) == "anonymous"
    assert names("x" * 65) == "anonymous"  # not a short identifier
    assert names("drop table; --") == "anonymous"
    assert names("Ok\n") == "anonymous"
    assert names(5) == names(["A"]) == names({"a": 1}) == "anonymous"  # JSON of other kinds


def test_each_app_counts_into_its_own_registry() -> None:
    first, second = ApiMetrics(), ApiMetrics()
    first.observe_request("Open", "OK", 0.01, refused=False)
    assert first.requests.labels("Open", "OK")._value.get() == 1
    assert second.requests.labels("Open", "OK")._value.get() == 0


async def test_metrics_on_a_port_of_their_own_are_not_on_the_api_port(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """With TENURE_API_METRICS_PORT set (as on Kubernetes, where an Ingress passes the API's
    port on), the API's port answers 404 at /metrics and Prometheus scrapes the requests
    counted there on the port of their own, which closes with the app."""
    port = free_port()
    settings = settings.model_copy(update={"api_metrics_port": port})
    account_id = new_id()
    async with run_worker(), api_client(settings, temporal_client) as http:
        opened = await http.post("/graphql", json={"query": OPEN, "variables": {"id": account_id}})
        assert opened.status_code == 200 and "errors" not in opened.json()
        assert (await http.get("/metrics")).status_code == 404
        async with httpx.AsyncClient() as prometheus:
            response = await prometheus.get(f"http://{settings.api_host}:{port}/metrics")
        assert response.status_code == 200
        scraped = Scrape(response.text)
        assert scraped.value("tenure_api_requests_total", operation="Open", code="OK") == 1
    assert port_is_free(port, settings.api_host)

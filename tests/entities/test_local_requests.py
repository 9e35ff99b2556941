"""A saga's request tries first as a local activity and, unless refused there, goes on as an
activity; histories of checkouts that requested so replay."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter

from entities.checkout_input import checkout_workflow_id
from entities.runtime.requests import REQUEST_ACTIVITY
from entities.runtime.saga import SagaStatus
from tests.conftest import WorkerFactory
from tests.entities.record_histories import HISTORIES, workflow_id_of
from tests.entities.shop import FAST_STEP, Shop, eventually, shop_settings
from workers.cache import SnapshotCache
from workers.sandbox import entity_replayer
from workers.settings import Settings

BALANCE = 1_000
# Checkouts recorded since their requests try first as local activities (LOCAL_TRY), by
# `record_histories.record` into a scratch folder: the complete one, one out of stock, one out
# of money, and one whose account's worker was down for a while (its local tries timed out,
# which a replay must read back as it was: a timeout).
LOCAL_TRY = HISTORIES / "local-try"
LOCAL_TRY_HISTORIES = sorted(LOCAL_TRY.glob("checkout.*.json"))


def kinds(history: WorkflowHistory) -> list[EventType.ValueType]:
    return [event.event_type for event in history.events]


def scheduled_requests(history: WorkflowHistory) -> int:
    return sum(
        1
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and event.activity_task_scheduled_event_attributes.activity_type.name
        == REQUEST_ACTIVITY.name
    )


async def replays(history: WorkflowHistory) -> bool:
    replayer = entity_replayer(pydantic_data_converter)
    return (await replayer.replay_workflow(history)).replay_failure is None


async def test_a_checkout_asks_with_local_activities_and_its_history_replays(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    shop = Shop(temporal_client, cache, shop_settings(settings))
    async with run_worker(shop.settings):
        account_id = await shop.account(BALANCE)
        a, b = await shop.stock(5), await shop.stock(3)
        cart_id = await shop.cart(account_id, (a, 2, 100), (b, 1, 100))
        checkout_id = await shop.checkout(cart_id)
        done = await shop.finished(checkout_id)
        assert done.status is SagaStatus.COMPLETED
        assert await shop.balance(account_id) == BALANCE - 300

        handle = temporal_client.get_workflow_handle(checkout_workflow_id(checkout_id))
        history = await handle.fetch_history()
        # Two reservations, a withdrawal, two commits and the report: each a local
        # activity's marker, none an activity task.
        assert scheduled_requests(history) == 0
        assert kinds(history).count(EventType.EVENT_TYPE_MARKER_RECORDED) >= 6
        assert await replays(history)


async def test_a_request_the_entity_cannot_answer_at_once_goes_on_as_a_visible_activity(
    temporal_client: Client, cache: SnapshotCache, settings: Settings, run_worker: WorkerFactory
) -> None:
    # The account's worker is down: the withdrawal's local try times out, and the request
    # goes on as an activity, pending where an operator can see it.
    step = {**FAST_STEP, "timeout_seconds": 2, "attempts": 50}
    shop = Shop(temporal_client, cache, shop_settings(settings, checkout={"step": step}))
    bank, account_id = await shop.unserved_account(run_worker, BALANCE)
    async with run_worker(shop.settings):
        sku = await shop.stock(5)
        cart_id = await shop.cart(account_id, (sku, 2, 300))
        checkout_id = await shop.checkout(cart_id)
        await eventually(lambda: shop.pending_attempt(checkout_id), lambda n: n >= 1, 30)
        async with run_worker(bank.settings):
            done = await shop.finished(checkout_id)
        assert done.status is SagaStatus.COMPLETED
        assert await bank.balance(account_id) == BALANCE - 600

        handle = temporal_client.get_workflow_handle(checkout_workflow_id(checkout_id))
        history = await handle.fetch_history()
        assert scheduled_requests(history) == 1  # the withdrawal, after its local try
        assert await replays(history)


def test_the_recorded_local_histories_cover_both_paths() -> None:
    names = {path.stem for path in LOCAL_TRY_HISTORIES}
    assert names == {
        "checkout.cart-done-1",
        "checkout.cart-short-1",
        "checkout.cart-broke-1",
        "checkout.cart-stuck-1",
    }
    for path in LOCAL_TRY_HISTORIES:
        history = WorkflowHistory.from_json(workflow_id_of(path), path.read_text())
        # Only the stuck checkout's requests waited for an account whose worker was down.
        retried = scheduled_requests(history) > 0
        assert retried is (path.stem == "checkout.cart-stuck-1"), path.stem


@pytest.mark.parametrize("path", LOCAL_TRY_HISTORIES, ids=lambda path: Path(path).stem)
async def test_a_recorded_local_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(workflow_id_of(path), path.read_text())
    assert await replays(history)

"""Query answers never make a workflow task's completion too large for Temporal
(workers.answer_budget): past 4 MiB gRPC refuses the completion and Temporal terminates the
entity (GrpcMessageTooLarge). A probe got a popular inventory item terminated so, with its
stock, by customers' checkouts asking the outcomes of their reservations at once."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus

from entities.inventory import inventory
from entities.runtime.envelope import CommandEnvelope, Snapshot
from entities.runtime.workflow import INLINE_STATE_BYTES
from tests.conftest import GraphQLClient, WorkerFactory, api_client, new_id
from workers.answer_budget import ANSWERS_FULL, LEGACY_QUERY_ID, bound_answers
from workers.delivery import CommandDelivery
from workers.runners import Completion
from workers.settings import Settings
from workers.temporal import ask

RESERVATIONS = 400
QUERIES = 60  # buffered together: Tenure's servers buffer up to 64 per workflow


def _answer(completion: Completion, query_id: str, size: int) -> None:
    command = completion.successful.commands.add()
    command.respond_to_query.query_id = query_id
    command.respond_to_query.succeeded.response.data = b"x" * size


def test_answers_past_the_budget_fail_to_be_asked_again_and_direct_ones_never() -> None:
    completion = Completion(run_id="r")
    completion.successful.commands.add().start_timer.seq = 1  # a command of the task's own
    for n in range(5):
        _answer(completion, f"q{n}", 300)
    _answer(completion, LEGACY_QUERY_ID, 5000)
    assert bound_answers(completion, budget=1000) == 2
    alone = Completion(run_id="r")
    _answer(alone, "large", 5000)  # over the budget, and first: answered all the same
    assert bound_answers(alone, budget=1000) == 0
    results = [
        c.respond_to_query for c in completion.successful.commands if c.HasField("respond_to_query")
    ]
    answered = [r.query_id for r in results if r.HasField("succeeded")]
    assert answered == ["q0", "q1", "q2", LEGACY_QUERY_ID]
    assert [r.failed.message for r in results if r.HasField("failed")] == [ANSWERS_FULL] * 2


async def test_many_answers_of_a_large_state_at_once_leave_the_entity_running(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """An item of 400 reservations (about 85 KB of state), and 60 reads of it buffered
    behind one workflow task while no worker runs: a worker then answers them all in that
    task's completion, over 5 MB, which Temporal refused and terminated the item. Now each read
    is answered, some a task later, and the item runs on with its stock."""
    delivery = CommandDelivery(temporal_client, settings)
    sku = f"big-{new_id()}"
    handle = temporal_client.get_workflow_handle(inventory.workflow_id(sku))

    async def send(command: str, payload: dict[str, object], key: str) -> None:
        envelope = CommandEnvelope(command_id=key, name=command, payload=payload)
        await delivery.deliver(inventory, sku, envelope)

    async with run_worker():
        await send("restock", {"quantity": RESERVATIONS * 2}, "stock")
        for n in range(RESERVATIONS):
            held = f"{n:04d}-" + "r" * 120  # about as long as a checkout's reservation id
            await send("reserveStock", {"reservation_id": held, "quantity": 1}, f"hold-{n}")
        held = await ask(handle, "snapshot", result_type=Snapshot, seconds=30)
        while len(held.state["reservations"]) < RESERVATIONS:  # type: ignore[index]
            await asyncio.sleep(0.2)
            held = await ask(handle, "snapshot", result_type=Snapshot, seconds=30)
        assert len(held.model_dump_json()) > 80_000
    # No worker: a command schedules a task, and the reads wait for it together.
    await send("restock", {"quantity": 1}, "one-more")
    reads = [
        asyncio.create_task(ask(handle, "snapshot", result_type=Snapshot, seconds=60))
        for _ in range(QUERIES)
    ]
    await asyncio.sleep(1.0)
    async with run_worker():
        answers = await asyncio.gather(*reads)
        assert {len(a.state["reservations"]) for a in answers} == {RESERVATIONS}  # type: ignore[index]
        assert {a.state["on_hand"] for a in answers} == {RESERVATIONS * 2 + 1}  # type: ignore[index]
        description = await handle.describe()
        assert description.status is WorkflowExecutionStatus.RUNNING
        events = [e.event_type async for e in handle.fetch_history_events()]
        assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in events


async def test_a_waited_command_to_a_large_entity_answers_its_state_without_recording_it(
    settings: Settings, temporal_client: Client, run_worker: WorkerFactory
) -> None:
    """An update's answer is recorded in the history, and ten in flight share one task's
    completion: a state over INLINE_STATE_BYTES stays out of it, and the API reads the state
    after the command from the cache or the entity instead."""
    sku = f"big-{new_id()}"
    handle = temporal_client.get_workflow_handle(inventory.workflow_id(sku))
    reserve = """mutation($sku: String!, $id: String!) { reserveStock(sku: $sku,
      reservationId: $id, quantity: 1, wait: true) { status revision
      inventoryItem { revision reserved } } }"""
    async with run_worker(), api_client(settings, temporal_client) as http:
        gql = GraphQLClient(http)
        restock = """mutation($sku: String!) { restock(sku: $sku, quantity: 1000, wait: true) {
          status } }"""
        await gql.data(restock, sku=sku)
        run_id = (await handle.describe()).run_id
        for n in range(150):  # about 30 KB of state
            held = f"{n:04d}-" + "r" * 120
            answer = (await gql.data(reserve, sku=sku, id=held))["reserveStock"]
            assert answer["status"] == "APPLIED"
            assert answer["revision"] == answer["inventoryItem"]["revision"] == n + 2
            assert answer["inventoryItem"]["reserved"] == n + 1
    sizes = []
    while run_id:  # every run, the first on (a large history continues as new sooner)
        run = temporal_client.get_workflow_handle(handle.id, run_id=run_id)
        run_id = ""
        async for event in run.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
                sizes.append(event.ByteSize())
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                run_id = (
                    event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                )
    assert len(sizes) >= 151 and max(sizes) < INLINE_STATE_BYTES + 4096, max(sizes)

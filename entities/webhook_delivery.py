"""WebhookDelivery: one subscriber's outbound webhooks, for as long as it is registered.

The workflow (`webhook:<subscriber id>`) runs outside the entity workflows and holds no
events itself: each run of its activity (workers/webhook_delivery.py) reads the change
streams of the subscriber's entity types through the subscriber's own consumer group, sends
what the subscriber asked for, and acknowledges each entry once it was delivered or
dead-lettered. The entries, the retries' schedules and the dead letters live in Redis,
so the workflow's history holds only the activity's runs and their counts, and it continues
as new every `RUNS_PER_HISTORY` runs. It ends when its subscriber is removed.

The subscriber (URL, secret, filter) is kept in Redis, not in the workflow's input, so that
the secret never enters Temporal's history and a removal is seen at the activity's next look.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from entities.runtime.activities import Activity

WEBHOOK_WORKFLOW = "WebhookDelivery"
RUN_SECONDS = 60.0
"""How long one run of the activity delivers before it reports back."""
RUNS_PER_HISTORY = 100


def webhook_workflow_id(subscriber_id: str) -> str:
    return f"webhook:{subscriber_id}"


class DeliveryCounts(BaseModel):
    """What a subscriber's deliveries have come to, carried across continue-as-new."""

    delivered: int = 0
    dead_lettered: int = 0
    ignored: int = Field(default=0, description="Entries the subscriber's filter leaves out.")

    def add(self, other: DeliveryCounts) -> None:
        self.delivered += other.delivered
        self.dead_lettered += other.dead_lettered
        self.ignored += other.ignored


class WebhookDeliveryInput(BaseModel):
    subscriber_id: str
    counts: DeliveryCounts = Field(default_factory=DeliveryCounts)


class DeliveryRun(BaseModel):
    """One run of the delivery activity."""

    subscriber_id: str
    seconds: float = RUN_SECONDS


class DeliveryRunResult(BaseModel):
    counts: DeliveryCounts = Field(default_factory=DeliveryCounts)
    removed: bool = Field(default=False, description="The subscriber is no longer registered.")


_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


DELIVER_ACTIVITY = Activity("deliver_webhooks", DeliveryRun, DeliveryRunResult)


@workflow.defn(name=WEBHOOK_WORKFLOW)
class WebhookDeliveryWorkflow:
    """Delivers a subscriber's webhooks until it is removed."""

    @workflow.init
    def __init__(self, input: WebhookDeliveryInput) -> None:
        self._counts = input.counts

    @workflow.query(name="counts")
    def counts(self) -> DeliveryCounts:
        return self._counts

    @workflow.run
    async def run(self, input: WebhookDeliveryInput) -> DeliveryCounts:
        for _ in range(RUNS_PER_HISTORY):
            result = await DELIVER_ACTIVITY.execute(
                DeliveryRun(subscriber_id=input.subscriber_id),
                # A run ends on its own after RUN_SECONDS, plus one send in flight.
                start_to_close_timeout=timedelta(seconds=RUN_SECONDS + 120),
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=_RETRY,
            )
            self._counts.add(result.counts)
            if result.removed:
                await workflow.wait_condition(workflow.all_handlers_finished)
                return self._counts
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(input.model_copy(update={"counts": self._counts}))

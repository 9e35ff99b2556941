"""A bound on the query answers one workflow task carries, so that traffic can never make
a task's completion too large for Temporal.

A query that reaches an entity while its workflow task is in flight waits for that task
(Temporal buffers up to `history.MaxBufferedQueryCount`, 64 on Tenure's servers), and the
worker answers every waiting query in the task's completion, beside the task's own commands.
gRPC refuses a message over 4 MiB, and Temporal terminates a workflow whose task completion
is refused so (GrpcMessageTooLarge): a customer's checkouts of a popular item, each asking
the outcome of its reservation, got 64 answers of its 50 KB state into one completion, and
the item was terminated with its stock.

Every buffered query comes in one activation (sdk-core dispatches a task's pending queries
together), so its answers are counted there: those past ANSWERS_PER_TASK fail with
ANSWERS_FULL, which `workers.temporal.ask` asks again, and the next task answers them. A
query sent straight to the worker (core's "legacy_query") is answered alone, in a message of
its own, and is never counted. The run's own commands stay within their bounds: a state of
at most 512 KiB (`max_state_bytes`), update answers that carry a state of at most
`INLINE_STATE_BYTES` (`entities.runtime.workflow`), a continue-as-new input and a publish
under Temporal's 2 MB payload limit.
"""

from __future__ import annotations

from workers.runners import Activation, Completion, WrappedInstance, WrappingRunner

ANSWERS_PER_TASK = 512 * 1024
"""Bytes of successful query answers one workflow task's completion may carry."""
LEGACY_QUERY_ID = "legacy_query"
"""sdk-core's id for a query sent straight to the worker, outside any task."""
ANSWERS_FULL = (
    "tenure: this workflow task carries as many answers as it may; ask again, the next "
    "task answers it"
)


def bound_answers(completion: Completion, budget: int = ANSWERS_PER_TASK) -> int:
    """Fail the buffered queries' answers of `completion` past `budget` bytes, in order,
    the first answered whatever its size (a state of up to `max_state_bytes`, 1 MiB at
    most, fits alone); returns how many were failed."""
    spent = failed = 0
    for command in completion.successful.commands:
        if not command.HasField("respond_to_query"):
            continue
        result = command.respond_to_query
        if result.query_id == LEGACY_QUERY_ID or not result.HasField("succeeded"):
            continue
        size = result.succeeded.response.ByteSize()
        if spent == 0 or spent + size <= budget:  # the first always: one state fits alone
            spent += size
            continue
        result.ClearField("succeeded")
        result.failed.message = ANSWERS_FULL
        result.failed.application_failure_info.SetInParent()
        failed += 1
    return failed


class _BoundedInstance(WrappedInstance):
    def activate(self, act: Activation) -> Completion:
        completion = self._inner.activate(act)
        if any(job.HasField("query_workflow") for job in act.jobs):
            bound_answers(completion)
        return completion


class AnswerBudgetRunner(WrappingRunner):
    """Runs workflows with `inner`, bounding the query answers of each workflow task."""

    instance_type = _BoundedInstance

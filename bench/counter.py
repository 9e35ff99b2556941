"""The raw baseline: a minimal counter workflow written straight against the Temporal SDK.

It is what a team would hand-write instead of using Tenure: a signal adds (an update adds and
answers the total), a query reads, and the run continues as new after as many signals as an
entity run takes, so it can take any number of them. No ledger, no cache, no GraphQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from temporalio import workflow

WORKFLOW = "BenchCounter"


@dataclass
class CounterInput:
    """The counter's value carried across runs, and how many signals one run takes."""

    value: int = 0
    max_signals_per_run: int = 1000


@workflow.defn(name=WORKFLOW)
class CounterWorkflow:
    """Adds each `add` signal's (or `add_and_read` update's) amount; `value` reads the
    total."""

    @workflow.init
    def __init__(self, input: CounterInput) -> None:
        self._value = input.value
        self._signals = 0

    @workflow.signal
    def add(self, amount: int) -> None:
        self._value += amount
        self._signals += 1

    @workflow.update
    def add_and_read(self, amount: int) -> int:
        """Add, and answer the total: a waited command, hand-written."""
        self.add(amount)
        return self._value

    @workflow.query
    def value(self) -> int:
        return self._value

    @workflow.run
    async def run(self, input: CounterInput) -> None:
        await workflow.wait_condition(
            lambda: (
                self._signals >= input.max_signals_per_run
                or workflow.info().is_continue_as_new_suggested()
            )
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(CounterInput(self._value, input.max_signals_per_run))

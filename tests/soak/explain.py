"""`python -m tests.soak.explain <account id> [folder]`: where the commands acknowledged to an
account that a soak found short went, from what the soak kept (`driver.KEPT_HISTORIES`):
every run's history and the keys acknowledged, in order.

It reports each run whose revision moved by other than the commands new to it (delivered by
signal or by an update, not already in the ledger it began with), each acknowledged key that
no run was ever delivered, and each key a run was delivered but did not carry over applied
to the next. Deposits are never refused, so in a soak each command new to a run raises its
revision by one.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entities.account import account as account_type
from tests.soak.driver import KEPT_HISTORIES, kept_keys, kept_run

SOUND = (
    "every acknowledged key was delivered, and every run that ended carried over applied "
    "each one new to it"
)


@dataclass
class Run:
    """What one run's history says: when it began, the revision and ledger it began with and
    carried over (None while it runs), and the commands delivered to it, by id, with how."""

    run_id: str
    began: str
    first_revision: int
    first_ledger: dict[str, str]
    last_revision: int | None = None
    last_ledger: dict[str, str] | None = None
    delivered: dict[str, str] = field(default_factory=dict)


def _decoded(payload: dict[str, Any]) -> Any:
    try:
        return json.loads(base64.b64decode(payload.get("data", "")))
    except (binascii.Error, ValueError):
        return None


def _commands(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The command envelopes in a signal's or an update's payloads; not the ones that cannot
    be read (the soak's batches to cold accounts carry one), which are refused, not applied."""
    found: list[dict[str, Any]] = []
    for payload in payloads:
        value = _decoded(payload)
        for item in value if isinstance(value, list) else [value]:
            if (
                isinstance(item, dict)
                and isinstance(item.get("command_id"), str)
                and isinstance(item.get("payload"), dict)
            ):
                found.append(item)
    return found


def _input(attributes: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """A run input's revision and ledger (command id: status)."""
    (value,) = [_decoded(p) for p in attributes["input"]["payloads"]]
    ledger = {o["command_id"]: o["status"] for o in value.get("ledger") or []}
    return int(value.get("revision", 0)), ledger


def read_run(history: dict[str, Any], run_id: str) -> Run:
    events = history["events"]
    began = events[0]
    revision, ledger = _input(began["workflowExecutionStartedEventAttributes"])
    run = Run(run_id, began["eventTime"], revision, ledger)
    for event in events:
        if signalled := event.get("workflowExecutionSignaledEventAttributes"):
            how = f"signal {signalled['signalName']} at event {event['eventId']}"
            for command in _commands(signalled.get("input", {}).get("payloads", [])):
                run.delivered.setdefault(command["command_id"], how)
        elif accepted := event.get("workflowExecutionUpdateAcceptedEventAttributes"):
            request = accepted["acceptedRequest"]["input"]
            how = f"update {request['name']} at event {event['eventId']}"
            for command in _commands(request.get("args", {}).get("payloads", [])):
                run.delivered.setdefault(command["command_id"], how)
        elif continued := event.get("workflowExecutionContinuedAsNewEventAttributes"):
            run.last_revision, run.last_ledger = _input(continued)
    return run


def explain(runs: list[Run], acknowledged: list[str]) -> list[str]:
    """What went wrong, one line each; none when every acknowledged key is accounted for."""
    runs = sorted(runs, key=lambda run: run.began)
    lines: list[str] = []
    for run in runs:
        new = [key for key in run.delivered if key not in run.first_ledger]
        if run.last_revision is not None and run.last_revision - run.first_revision != len(new):
            lines.append(
                f"run {run.run_id}: revision {run.first_revision} -> {run.last_revision}, "
                f"but {len(new)} commands new to it were delivered"
            )
        if run.last_ledger is None:
            continue
        for key in new:
            status = run.last_ledger.get(key)
            if status != "APPLIED":
                lines.append(
                    f"{key}: delivered to run {run.run_id} by {run.delivered[key]}, carried "
                    f"over {status or 'not at all'}"
                )
    delivered = {key for run in runs for key in run.delivered}
    lines += [
        f"{key}: acknowledged, never delivered" for key in acknowledged if key not in delivered
    ]
    return lines


def main(account: str, folder: Path = KEPT_HISTORIES) -> list[str]:
    acknowledged = list(json.loads(kept_keys(account, folder).read_text()))
    workflow_id = account_type.workflow_id(account)
    prefix = kept_run(workflow_id, "", folder).stem
    runs = [
        read_run(json.loads(path.read_text()), path.stem[len(prefix) :])
        for path in folder.glob(kept_run(workflow_id, "*", folder).name)
    ]
    return [f"{len(runs)} runs, {len(acknowledged)} keys acknowledged"] + (
        explain(runs, acknowledged) or [SOUND]
    )


if __name__ == "__main__":
    print("\n".join(main(sys.argv[1], *(Path(a) for a in sys.argv[2:3]))))

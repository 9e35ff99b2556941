"""`python -m tests.soak.explain` names the run that lost commands and the keys it lost, from
histories shaped as the soak keeps them (pure code)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tests.soak.explain import SOUND, main


def _payloads(value: Any) -> dict[str, Any]:
    return {"payloads": [{"data": base64.b64encode(json.dumps(value).encode()).decode()}]}


def _input(revision: int, applied: list[str]) -> dict[str, Any]:
    ledger = [{"command_id": key, "status": "APPLIED"} for key in applied]
    return _payloads({"revision": revision, "ledger": ledger})


def _deposit(key: str) -> dict[str, Any]:
    return {"command_id": key, "name": "deposit", "payload": {"amount": 1}}


def _history(began: str, revision: int, ledger: list[str], *events: dict[str, Any]) -> str:
    started = {"workflowExecutionStartedEventAttributes": {"input": _input(revision, ledger)}}
    numbered = [{"eventId": str(n), "eventTime": began, **e} for n, e in enumerate(events, 2)]
    return json.dumps({"events": [{"eventId": "1", "eventTime": began, **started}, *numbered]})


def _signal(*keys: str) -> dict[str, Any]:
    unreadable = {"command_id": "bad", "name": "deposit", "payload": "not an object"}
    batch = [_deposit(key) for key in keys] + [unreadable]  # refused, never applied
    return {
        "workflowExecutionSignaledEventAttributes": {
            "signalName": "commands",
            "input": _payloads(batch),
        }
    }


def _update(key: str) -> dict[str, Any]:
    request = {"name": "apply", "args": _payloads(_deposit(key))}
    return {
        "workflowExecutionUpdateAcceptedEventAttributes": {"acceptedRequest": {"input": request}}
    }


def _continued(revision: int, ledger: list[str]) -> dict[str, Any]:
    attributes = {"input": _input(revision, ledger)}
    return {"workflowExecutionContinuedAsNewEventAttributes": attributes}


def test_the_run_that_lost_commands_and_the_keys_it_lost_are_named(tmp_path: Path) -> None:
    opened = ["open", "verify"]
    first = _history(
        "2026-12-06T01:00:00Z",
        2,
        opened,
        _signal("k1", "k2"),
        _update("k3"),
        _continued(4, [*opened, "k1", "k3"]),  # k2 delivered, not carried over
    )
    second = _history(
        "2026-12-06T01:00:01Z", 4, [*opened, "k1", "k3"], _update("k3"), _signal("k5")
    )
    (tmp_path / "account_a-run1.json").write_text(first)
    (tmp_path / "account_a-run2.json").write_text(second)
    (tmp_path / "a-acknowledged.json").write_text(
        json.dumps(dict.fromkeys(["k1", "k2", "k3", "k4", "k5"], 1))
    )
    assert main("a", tmp_path) == [
        "2 runs, 5 keys acknowledged",
        "run run1: revision 2 -> 4, but 3 commands new to it were delivered",
        "k2: delivered to run run1 by signal commands at event 2, carried over not at all",
        "k4: acknowledged, never delivered",
    ]


def test_runs_that_account_for_every_key_are_reported_sound(tmp_path: Path) -> None:
    history = _history("2026-12-06T01:00:00Z", 0, [], _update("k1"), _continued(1, ["k1"]))
    (tmp_path / "account_b-run1.json").write_text(history)
    (tmp_path / "b-acknowledged.json").write_text(json.dumps({"k1": 1}))
    assert main("b", tmp_path)[1:] == [SOUND]

"""The shipped alerts, evaluated by Prometheus's own rule tester (`promtool test rules`, from
Debian's prometheus package, which .ci/run installs): each fires on the series a running
Tenure exports, as the scrape routes in docs/operations.md name them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "alerts.yml"
FAILED_SUMMARY = "A checkout ended FAILED: something could not be undone, an operator must act"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "ALERT TESTS NOT RUN: no promtool (apt-get install prometheus)"
        if os.environ.get("TENURE_REQUIRE_PROMTOOL") == "1":
            pytest.fail(reason + "; TENURE_REQUIRE_PROMTOOL=1 requires it")
        pytest.skip(reason)
    return path


def _failed(values: str) -> dict[str, str]:
    # The SDK exports a counter's series from its first increment, at 1: no 0 before it.
    return {
        "series": 'tenure_saga_outcomes_total{status="FAILED",job="tenure-worker",instance="w1"}',
        "values": values,
    }


def _fires(alert: str, at: str, summary: str, severity: str = "page") -> dict[str, object]:
    expected = {"exp_labels": {"severity": severity}, "exp_annotations": {"summary": summary}}
    return {"eval_time": at, "alertname": alert, "exp_alerts": [expected]}


def _silent(alert: str, at: str) -> dict[str, object]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


DEAD_LETTERED = "Webhooks were dead-lettered: a receiver is failing; fix it, then replay"
LOST = "A webhook subscription was lost (Redis restarted empty): register it again"
WORKER = 'job="tenure-worker",instance="w1",activity_type="deliver_webhooks"'
OTHER_WORKER = 'job="tenure-worker",instance="w2",activity_type="deliver_webhooks"'

BEHIND = "Changes reach the cache over 10 s late (p99): CACHED reads trail the entities"


def _lag(le: str, values: str) -> dict[str, str]:
    labels = 'job="tenure-worker",instance="w1",entity_type="account",by="offer"'
    return {"series": f'tenure_publish_lag_seconds_bucket{{le="{le}",{labels}}}', "values": values}


CASES = [
    {  # Changes in the cache within 0.25 s for 20 minutes, then 10-30 s late (a worker behind).
        "interval": "1m",
        "input_series": [
            *(_lag(le, "0+100x20 2000x40") for le in ("0.25", "1", "10")),
            *(_lag(le, "0+100x60") for le in ("30", "+Inf")),
        ],
        "alert_rule_test": [
            _silent("TenureCacheBehind", "18m"),
            _silent("TenureCacheBehind", "28m"),  # late, not yet for 10 minutes
            _fires("TenureCacheBehind", "40m", BEHIND, "ticket"),
        ],
    },
    {  # A receiver failing: a worker exports its dead letters at 0 from its first run.
        "interval": "1m",
        "input_series": [
            {
                "series": f'tenure_webhooks_total{{outcome="dead_lettered",{WORKER}}}',
                "values": "0x10 1x30",
            },
        ],
        "alert_rule_test": [
            _silent("TenureWebhooksDeadLettered", "8m"),
            _fires("TenureWebhooksDeadLettered", "12m", DEAD_LETTERED, "ticket"),
            _silent("TenureWebhooksDeadLettered", "30m"),
        ],
    },
    {  # A subscription lost: on a series at 0, and on one born at 1 (a worker's first run).
        "interval": "1m",
        "input_series": [
            {"series": f"tenure_webhook_subscribers_lost_total{{{WORKER}}}", "values": "0x10 1x30"},
            {
                "series": f"tenure_webhook_subscribers_lost_total{{{OTHER_WORKER}}}",
                "values": "_x30 1x20",
            },
        ],
        "alert_rule_test": [
            _silent("TenureWebhookSubscriberLost", "8m"),
            _fires("TenureWebhookSubscriberLost", "12m", LOST),
            _silent("TenureWebhookSubscriberLost", "28m"),
            _fires("TenureWebhookSubscriberLost", "33m", LOST),
            _silent("TenureWebhookSubscriberLost", "49m"),
        ],
    },
    {  # A worker's first FAILED checkout: the series appears at 1.
        "interval": "1m",
        "input_series": [_failed("_x5 1x30")],
        "alert_rule_test": [
            _silent("TenureCheckoutFailed", "4m"),
            _fires("TenureCheckoutFailed", "7m", FAILED_SUMMARY),
            _silent("TenureCheckoutFailed", "25m"),
        ],
    },
    {  # One more, on a series already there.
        "interval": "1m",
        "input_series": [_failed("1x25 2x20")],
        "alert_rule_test": [
            _silent("TenureCheckoutFailed", "20m"),
            _fires("TenureCheckoutFailed", "27m", FAILED_SUMMARY),
            _silent("TenureCheckoutFailed", "44m"),
        ],
    },
    {  # A worker restarted under the same instance label: its old process had counted one,
        # and the new one exports the series at 0 from its start, then counts its first.
        "interval": "1m",
        "input_series": [_failed("1x10 _x3 0x5 1x20")],
        "alert_rule_test": [
            _silent("TenureCheckoutFailed", "17m"),
            _fires("TenureCheckoutFailed", "21m", FAILED_SUMMARY),
            _silent("TenureCheckoutFailed", "38m"),
        ],
    },
    {  # Workers scraped by compose's job, or by a ServiceMonitor on their metrics Service.
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="tenure-worker",instance="w1"}', "values": "0x10"},
            {"series": 'up{job="tenure-worker-metrics",instance="w2"}', "values": "0x10"},
            {"series": 'up{job="tenure-api",instance="a1"}', "values": "1x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "TenureWorkerDown",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "page", "job": job, "instance": instance},
                        "exp_annotations": {
                            "summary": f"Worker {instance} is not answering /metrics"
                        },
                    }
                    for job, instance in (("tenure-worker", "w1"), ("tenure-worker-metrics", "w2"))
                ],
            },
            _silent("TenureApiDown", "5m"),
        ],
    },
]


def test_the_alerts_fire_on_the_series_tenure_exports(tmp_path: Path) -> None:
    promtool = _promtool()
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(
        yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": CASES})
    )
    ran = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr


DASHBOARD = ALERTS.parent / "grafana" / "dashboards" / "tenure.json"


def test_the_saga_outcomes_panel_shows_a_worker_s_first_outcome_of_a_status(
    tmp_path: Path,
) -> None:
    """The panel's increase() saw nothing of a series that a worker exports from its first
    increment, at 1: a worker's first FAILED checkout never showed. Evaluated with a 1m
    window, the new FAILED series shows its 1 once, and an older series its increase."""
    promtool = _promtool()
    [panel] = [
        p
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if p.get("title") == "Checkout (saga) outcomes"
    ]
    expr = panel["targets"][0]["expr"].replace("$__rate_interval", "1m")
    labels = 'job="tenure-worker",instance="w1",workflow_type="Checkout"'
    case = {
        "interval": "15s",
        "input_series": [
            {
                "series": f'tenure_saga_outcomes_total{{status="FAILED",{labels}}}',
                "values": "_x20 1x40",
            },
            {
                "series": f'tenure_saga_outcomes_total{{status="COMPLETED",{labels}}}',
                "values": "1x20 2x40",
            },
        ],
        "promql_expr_test": [
            {
                "expr": expr,
                "eval_time": "5m30s",
                "exp_samples": [
                    {"labels": '{status="FAILED"}', "value": 1},
                    {"labels": '{status="COMPLETED"}', "value": 1},
                ],
            },
            {  # past the window: nothing new
                "expr": expr,
                "eval_time": "8m",
                "exp_samples": [
                    {"labels": '{status="FAILED"}', "value": 0},
                    {"labels": '{status="COMPLETED"}', "value": 0},
                ],
            },
        ],
    }
    tests = tmp_path / "panel_test.yml"
    tests.write_text(yaml.safe_dump({"evaluation_interval": "15s", "tests": [case]}))
    ran = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr


COMPOSE = ALERTS.parent


def test_the_compose_prometheus_sends_what_fires_to_an_alertmanager_that_routes_it(
    tmp_path: Path,
) -> None:
    """The compose Prometheus loaded the alerts and sent them nowhere: no `alerting`, no
    Alertmanager, so a `page` was only ever seen by someone looking at Prometheus. Its config
    passes promtool with the rules where compose mounts them; it names compose's
    Alertmanager; and every alert, page or ticket, has a receiver there."""
    promtool = _promtool()
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"]
    manager = compose["alertmanager"]
    port = manager["ports"][0].rpartition(":")[2]
    targets = [
        t
        for a in config["alerting"]["alertmanagers"]
        for s in a["static_configs"]
        for t in s["targets"]
    ]
    assert targets == [f"alertmanager:{port}"]
    assert "./alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in manager["volumes"]
    # promtool reads the rule files named in the config: where compose mounts them, here.
    config["rule_files"] = [str(ALERTS)]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    ran = subprocess.run(
        [promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    routing = yaml.safe_load((COMPOSE / "alertmanager.yml").read_text())
    receivers = {receiver["name"] for receiver in routing["receivers"]}
    routes = [routing["route"], *routing["route"].get("routes", [])]
    assert all(route.get("receiver", routing["route"]["receiver"]) in receivers for route in routes)
    severities = {
        rule["labels"]["severity"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    assert severities == {"page", "ticket"}

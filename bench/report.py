"""Turning scenario results into ratios, target verdicts, results.json and results.md."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.scale import Scale
from bench.scenarios import Result


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, with what was measured against it."""

    name: str
    measured: str
    met: bool


IDLE_TARGETS = [
    ("idle_checkout", "one checkout on an idle stack: p50 < 150 ms", 150.0),
    ("idle_deposit_wait", "one waited deposit on an idle stack: p50 < 15 ms", 15.0),
]


def ratio(result: Result, by_key: dict[str, Result]) -> float | None:
    baseline = by_key.get(result.baseline or "")
    if baseline is None or not baseline.ops_per_s:
        return None
    return result.ops_per_s * result.signals_per_op / baseline.ops_per_s


def round_ratios(result: Result, by_key: dict[str, Result]) -> list[float] | None:
    """The ratio in each round, where the result and its baseline ran in alternating slices:
    how far a single figure can be trusted on this machine."""
    baseline = by_key.get(result.baseline or "")
    if baseline is None:
        return None
    ours, theirs = result.measured.slice_rates, baseline.measured.slice_rates
    if len(ours) < 2 or len(ours) != len(theirs) or not all(theirs):
        return None
    return [o * result.signals_per_op / t for o, t in zip(ours, theirs, strict=True)]


def _spread(result: Result, by_key: dict[str, Result]) -> str:
    rounds = round_ratios(result, by_key)
    return "" if rounds is None else f" (rounds {min(rounds):.2f}-{max(rounds):.2f})"


def p99_ratio(result: Result, by_key: dict[str, Result]) -> float | None:
    """The result's p99 latency over its baseline's."""
    baseline = by_key.get(result.baseline or "")
    if baseline is None or not baseline.measured.p99_ms > 0:
        return None
    return result.measured.p99_ms / baseline.measured.p99_ms


def _p99_spread(result: Result, by_key: dict[str, Result]) -> str:
    """The p99 ratio in each round, lowest and highest, as `_spread` does for throughput."""
    baseline = by_key.get(result.baseline or "")
    if baseline is None:
        return ""
    ours, theirs = result.measured.slice_p99_ms, baseline.measured.slice_p99_ms
    if len(ours) < 2 or len(ours) != len(theirs) or not all(t > 0 for t in theirs):
        return ""
    rounds = [o / t for o, t in zip(ours, theirs, strict=True)]
    return f" (rounds {min(rounds):.2f}-{max(rounds):.2f})"


def _a(role: str) -> str:
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}"


def _ratio_target(name: str, result: Result, by_key: dict[str, Result], least: float) -> Target:
    """A target of at least `least` times the result's baseline: the ratio and its rounds."""
    r = ratio(result, by_key) or 0.0
    return Target(name, f"{r:.2f} x{_spread(result, by_key)}", r >= least)


def _latency_target(name: str, result: Result, met: bool, more: str = "") -> Target:
    """A target on the result's latencies: its p50 and p99, then `more`."""
    measured = result.measured
    return Target(name, f"p50 {measured.p50_ms:.1f} ms, p99 {measured.p99_ms:.1f} ms{more}", met)


def targets(by_key: dict[str, Result], concurrency: int) -> list[Target]:
    found = []
    if "mutations" in by_key:
        found.append(
            _ratio_target(
                "GraphQL mutations >= 0.8 x raw SDK signals", by_key["mutations"], by_key, 0.8
            )
        )
    if "mutations_wait" in by_key:
        found.append(
            _ratio_target(
                "GraphQL mutations, wait: true >= 0.8 x raw SDK signal, then query",
                by_key["mutations_wait"],
                by_key,
                0.8,
            )
        )
    if "checkouts" in by_key:
        checkouts = by_key["checkouts"]
        found.append(
            _ratio_target(
                "checkout sagas >= 0.3 x raw SDK signals, 7 per checkout", checkouts, by_key, 0.3
            )
        )
        found.append(
            _latency_target(
                f"checkout sagas: p50 < 1 s at {concurrency} clients",
                checkouts,
                checkouts.measured.p50_ms < 1000,
            )
        )
    if "opens" in by_key:
        found.append(
            _ratio_target(
                "opening and verifying accounts >= 0.8 x raw SDK starts with a start signal",
                by_key["opens"],
                by_key,
                0.8,
            )
        )
    if "cached_reads" in by_key:
        cached = by_key["cached_reads"]
        found.append(_ratio_target("CACHED reads >= 10 x raw SDK queries", cached, by_key, 10))
        p99 = cached.measured.p99_ms
        found.append(
            Target(f"CACHED read p99 < 10 ms at {concurrency} clients", f"{p99:.1f} ms", p99 < 10)
        )
    if "hot" in by_key:
        hot = by_key["hot"]
        longest, bound = hot.details["max_history"], hot.details["history_bound"]
        found.append(
            Target(
                "hot entity: every run's history under the bound",
                f"{longest} events (bound {bound}, {hot.details['runs']} runs)",
                longest <= bound,
            )
        )
        r = ratio(hot, by_key) or 0.0
        found.append(Target("hot entity >= raw counter's commands/s", f"{r:.2f} x", r >= 1.0))
    for key, who in (
        ("cached_reads_hostile", "a hostile customer"),
        ("cached_reads_hostile_operator", "an operator sending the same, unlimited"),
    ):
        if key not in by_key:
            continue
        beside = by_key[key]
        r = p99_ratio(beside, by_key) or math.inf
        alone = by_key["cached_reads_alone"].measured.p99_ms
        found.append(
            Target(
                f"CACHED read p99 beside {who} < 1.5 x alone",
                f"{r:.2f} x ({beside.measured.p99_ms:.1f} ms against {alone:.1f})"
                + _p99_spread(beside, by_key),
                r < 1.5,
            )
        )
    if "cached_reads_token" in by_key:
        found.append(
            _ratio_target(
                "CACHED reads with a verified token >= 0.9 x without",
                by_key["cached_reads_token"],
                by_key,
                0.9,
            )
        )
    for key, name, bound in IDLE_TARGETS:
        if key in by_key:
            idle = by_key[key]
            found.append(
                _latency_target(
                    name, idle, idle.measured.p50_ms < bound, f" ({idle.measured.ops} runs)"
                )
            )
    many = [r for key, r in by_key.items() if key.startswith("many_")]
    if many:
        per_entity = [r.details["kib_per_entity"] for r in many]
        found.append(
            Target(
                "worker memory < 100 KiB per cached Account",
                " / ".join(
                    f"{r.details['cached_entities']:,}: {k:.0f} KiB"
                    for r, k in zip(many, per_entity, strict=True)
                ),
                per_entity[-1] < 100,
            )
        )
    listed = by_key.get("listing")
    if listed is not None:
        found.append(
            _latency_target(
                f"a filtered page of 50 of {listed.details['indexed']:,} indexed accounts: "
                f"p99 < 20 ms at {concurrency} clients",
                listed,
                listed.measured.p99_ms < 20,
                f"; index {listed.details['index_bytes_per_entity']} B per account",
            )
        )
    written = by_key.get("listing_while_written")
    if written is not None:
        found.append(
            _latency_target(
                f"the same page while {written.details['writes_per_s']} accounts a second are "
                f"written: p99 < 20 ms at {concurrency} clients",
                written,
                written.measured.p99_ms < 20,
            )
        )
    if "bulk_deposits" in by_key:
        found.append(
            _ratio_target(
                "bulk deposit sent >= 0.8 x raw SDK deposit signals",
                by_key["bulk_deposits"],
                by_key,
                0.8,
            )
        )
    if "bulk_deposits_applied" in by_key:
        applied = by_key["bulk_deposits_applied"]
        r = ratio(applied, by_key) or 0.0
        found.append(
            Target(
                "bulk deposit applied beside raw SDK deposit signals applied (no target: reported)",
                f"{r:.2f} x{_spread(applied, by_key)}",
                True,
            )
        )
    if "subscriptions" in by_key:
        found.append(
            _latency_target(
                "subscriptions: applied to seen, 1,000 subscribers (no target: reported)",
                by_key["subscriptions"],
                True,
            )
        )
    return found


def machine() -> dict[str, Any]:
    """Where the figures were taken, so a reader can weigh them."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        mem_kib = int(meminfo.read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "temporalio": version("temporalio"),
        "temporal_cli": _temporal_version(),
        "load_average": os.getloadavg(),
    }


def _temporal_version() -> str:
    from deploy.embedded import temporal_cli

    try:
        out = subprocess.run(
            [temporal_cli(), "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _row(result: Result, by_key: dict[str, Result]) -> str:
    r = ratio(result, by_key)
    against = "-" if r is None else f"{r:.2f} x {by_key[result.baseline or ''].title}"
    against += "" if r is None else _spread(result, by_key)
    if r is not None and result.signals_per_op > 1:
        against += f", {result.signals_per_op} per {result.unit[:-1]}"
    rss = f"{result.peak_rss_kib / 1024:.0f}" if result.peak_rss_kib else "-"
    verdict = "yes" if not result.problems else "**NO**"
    cpu = result.server_cpu_ms
    return (
        f"| {result.title} | {result.ops_per_s:,.0f} {result.unit}/s "
        f"| {_ms(result.measured.p50_ms)} | {_ms(result.measured.p99_ms)} "
        f"| {against} | {'-' if cpu is None else f'{cpu:.1f}'} "
        f"| {rss} | {verdict} |"
    )


def markdown(
    results: list[Result],
    found: list[Target],
    scale: Scale,
    info: dict[str, Any],
) -> str:
    by_key = {r.key: r for r in results}
    lines = [
        f"Scale `{scale.name}`, {scale.concurrency} concurrent clients; "
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; "
        f"Python {info['python']}, temporalio {info['temporalio']}, {info['temporal_cli']}.",
        "",
        "| scenario | throughput | p50 ms | p99 ms | ratio to baseline | CPU ms/op "
        "| peak worker RSS MiB | verified |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
        *(_row(r, by_key) for r in results),
        "",
    ]
    hot = [r for r in results if "max_history" in r.details]
    for r in hot:
        lines.append(
            f"- {r.title}: {r.details['runs']} runs, longest history "
            f"{r.details['max_history']} events; commands accepted at "
            f"{r.details['accepted_per_s']:,.0f}/s, applied at {r.ops_per_s:,.0f}/s."
        )
    for r in results:
        if "accepted_per_s" in r.details and not {"max_history", "worker_cpu_ms_per_op"} & set(
            r.details
        ):
            lines.append(
                f"- {r.title}: accepted at {r.details['accepted_per_s']:,.0f}/s, applied at "
                f"{r.ops_per_s:,.0f}/s (each slice timed until its commands were applied)."
            )
    for r in results:
        if "repeats" in r.details:
            d = r.details
            lines.append(
                f"- {r.title}: {d['clients']} clients, {r.measured.ops:,} mutations, "
                f"{d['waited']:,} with wait: true, {d['repeats']:,} repeating a key sent "
                f"before; {d['keys']:,} distinct keys acknowledged, {d['retries']} attempts "
                "retried with the same key."
            )
    for r in results:
        if "hostile" in r.details:
            d = r.details["hostile"]
            p99 = p99_ratio(r, by_key)
            lines.append(
                f"- {r.title}: one more client, {_a(d['role'])}, had "
                f"{d['requests']:,} copies of the worst document the limits allow "
                f"({d['document']}, {d['document_bytes']:,} bytes) answered, each in "
                f"{d['mean_ms']:.0f} ms on average, and {d['rate_limited']:,} refused "
                f"RATE_LIMITED; the readers' p99 {p99 or 0:.2f} x alone."
            )
    for r in results:
        if "worker_cpu_ms_per_op" in r.details:
            d = r.details
            cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in d["worker_cpu_ms_per_op"].items())
            lines.append(
                f"- {r.title}: accepted at {d['accepted_per_s']:,.0f}/s and applied at "
                f"{r.ops_per_s:,.0f}/s, to {d['accounts_per_round']} accounts opened for each "
                f"round; worker CPU ms per command: {cpu}."
            )
    for r in results:
        if "kib_per_entity" in r.details:
            lines.append(
                f"- {r.title}: worker RSS {r.details['worker_rss_kib'] / 1024:.0f} MiB, "
                f"{r.details['kib_per_entity']:.0f} KiB per cached account; new accounts "
                f"opened and verified at {r.details['opened_per_s']:,.0f}/s."
            )
    idle = [r for r in results if r.details.get("one_at_a_time")]
    if idle:
        lines.append(
            f"- idle rows: one client, one operation at a time and nothing else running, "
            f"{idle[0].measured.ops} of each after {idle[0].details['warm_up']} untimed; "
            "their throughput is one over the mean latency. A checkout is timed from its "
            "mutation until its saga's workflow returns its final status."
        )
    lines += [
        "",
        "Rounds: each comparison runs in alternating slices, baseline then Tenure; the range "
        "is the lowest and highest ratio of a single round.",
        "",
        "CPU ms/op: CPU time per operation of Temporal, Redis, both workers and the API "
        "together (not the load generator); it moves far less than throughput when other "
        "work shares the machine.",
    ]
    if "mutations_two_workers" in by_key and "mutations_one_worker" in by_key:
        one, two = by_key["mutations_one_worker"], by_key["mutations_two_workers"]
        scaling = ratio(two, by_key) or 0.0
        one_cpu, two_cpu = (sum(r.details["worker_cpu_ms_per_op"].values()) for r in (one, two))
        lines += [
            "",
            f"Scale-out: two Tenure worker processes applied {scaling:.2f} x the mutations "
            f"per second one did{_spread(two, by_key)}, spending {two_cpu:.2f} CPU ms per "
            f"command between them against {one_cpu:.2f} for one. No target: every process "
            f"here shares the same {info['cores']} cores, so a second worker brings no CPU of "
            "its own; the ratio says what splitting one machine's work costs, not what a "
            "second machine would add.",
        ]
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t.name} | {t.measured} | {'yes' if t.met else 'no'} |" for t in found]
    return "\n".join(lines) + "\n"


def write(
    directory: Path,
    results: list[Result],
    scale: Scale,
    info: dict[str, Any],
    settings: dict[str, Any],
) -> tuple[Path, Path, list[Target]]:
    """Write results.json and results.md into `directory`; returns their paths and the
    target verdicts."""
    by_key = {r.key: r for r in results}
    found = targets(by_key, scale.concurrency)
    document = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": scale.name,
        "concurrency": scale.concurrency,
        "machine": info,
        "settings": settings,
        "scenarios": [
            {
                "key": r.key,
                "title": r.title,
                "ops": r.measured.ops,
                "errors": r.measured.errors,
                "elapsed_s": round(r.measured.elapsed, 3),
                "ops_per_s": round(r.ops_per_s, 1),
                "p50_ms": round(r.measured.p50_ms, 2),
                "p99_ms": round(r.measured.p99_ms, 2),
                "baseline": r.baseline,
                "ratio": None if (x := ratio(r, by_key)) is None else round(x, 3),
                "round_ratios": [round(x, 3) for x in round_ratios(r, by_key) or []],
                "peak_worker_rss_kib": r.peak_rss_kib,
                "server_cpu_ms_per_op": r.server_cpu_ms,
                "exactly_once": not r.problems,
                "problems": r.problems,
                "details": r.details,
            }
            for r in results
        ],
        "targets": [{"name": t.name, "measured": t.measured, "met": t.met} for t in found],
    }
    json_path, md_path = directory / "results.json", directory / "results.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(markdown(results, found, scale, info))
    return json_path, md_path, found

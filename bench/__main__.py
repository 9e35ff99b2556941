"""`python -m bench --scale small|default`: every scenario in one run, a progress line for
each, results in bench/results.json and bench/results.md; exits 1 when any command was lost
or applied twice (or any check failed), whatever the speed."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import (
    authentication,
    bulk,
    hostile,
    idle,
    listing,
    mixed,
    opening,
    report,
    sagas,
    scale_out,
    scaling,
    scenarios,
    subscriptions,
)
from bench.scale import SCALES, Scale
from bench.scenarios import Bench, Result
from bench.stack import bench_stack

RESULTS_DIR = Path(__file__).parent

Scenario = Callable[[Bench], Awaitable[Result | list[Result]]]

SCENARIOS: list[tuple[str, Scenario]] = [
    ("raw SDK signals and GraphQL mutations", scenarios.writes),
    ("raw signal-then-query and mutations with wait: true", scenarios.waited_writes),
    ("raw SDK queries and GraphQL reads", scenarios.reads),
    ("one hot counter and one hot account", scaling.hot),
    ("checkout sagas", sagas.checkouts),
    # Between scenarios that leave nothing running: a single client, one operation at a time.
    ("idle stack: single operations, one at a time", idle.idle),
    (f"mixed traffic from {mixed.CLIENTS} clients", mixed.mixed),
    ("many live accounts", scaling.many_entities),
    ("scale-out: GraphQL mutations to one worker process and to two", scale_out.mutations),
    ("CACHED reads with and without a verified token", authentication.authenticated_reads),
    ("listing: a filtered page of 50 indexed accounts", listing.listing),
    ("subscriptions: 1,000 subscribers of one hot account", subscriptions.subscriptions),
    ("bulk deposit beside raw SDK deposit signals", bulk.bulk_deposits),
    ("opening and verifying accounts beside raw SDK starts", opening.opening),
    # Last, so that nothing the hostile documents leave in the API (a document up to 8 KiB
    # is kept parsed and validated) weighs on another scenario.
    ("CACHED reads beside a hostile document", hostile.hostile_reads),
]


def _progress(result: Result, by_key: dict[str, Result]) -> str:
    r = report.ratio(result, by_key)
    p50, p99 = result.measured.p50_ms, result.measured.p99_ms
    parts = [
        f"{result.title:<36}",
        f"{result.ops_per_s:>9,.0f} {result.unit}/s",
        "" if math.isnan(p50) else f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms",
        "" if r is None else f"ratio {r:.2f}",
        f"rss {result.peak_rss_kib / 1024:.0f} MiB" if result.peak_rss_kib else "",
        "ok" if not result.problems else "FAILED: " + "; ".join(result.problems[:3]),
    ]
    return "  ".join(p for p in parts if p)


async def run(scale: Scale, chosen: list[tuple[str, Scenario]]) -> int:
    started = time.monotonic()
    results: list[Result] = []
    crashed: list[str] = []
    info = report.machine()
    print(
        f"bench: scale {scale.name}, {scale.concurrency} clients, "
        f"load average {info['load_average'][0]:.2f}",
        flush=True,
    )
    async with bench_stack(scale.concurrency) as stack:
        bench = Bench(stack, scale)
        for n, (name, scenario) in enumerate(chosen, 1):
            print(f"[{n}/{len(chosen)}] {name} ...", flush=True)
            try:
                outcome = await scenario(bench)
            except Exception as exc:
                # Later scenarios still run; the benchmark fails all the same.
                crashed.append(name)
                print(f"      FAILED: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                continue
            for result in outcome if isinstance(outcome, list) else [outcome]:
                results.append(result)
                print("      " + _progress(result, {r.key: r for r in results}), flush=True)
        settings = stack.settings.model_dump(
            mode="json",
            include={
                "runtime",
                "max_cached_workflows",
                "max_concurrent_workflow_tasks",
                "workflow_sandbox",
                "live_read_timeout",
            },
        )
    info["load_average_after"] = report.machine()["load_average"]
    json_path, md_path, _ = report.write(RESULTS_DIR, results, scale, info, settings)
    print(f"\n{md_path.read_text()}")
    print(f"wrote {json_path} and {md_path} in {time.monotonic() - started:.0f}s")
    failed = [r.key for r in results if r.problems] + crashed
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _choose(wanted: list[str]) -> list[tuple[str, Scenario]]:
    chosen: list[tuple[str, Scenario]] = []
    for item in wanted:
        if item.isdigit():
            chosen.append(SCENARIOS[int(item) - 1])
        else:
            chosen += [s for s in SCENARIOS if item.lower() in s[0].lower()]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument(
        "--only",
        metavar="N,N",
        help="run only these scenarios, by number or by a word of their name "
        "(reads need the writes before them)",
    )
    args = parser.parse_args()
    chosen = SCENARIOS
    if args.only:
        chosen = _choose(args.only.split(","))
        if not chosen:
            parser.error(f"no scenario matches {args.only!r}")
    sys.exit(asyncio.run(run(SCALES[args.scale], chosen)))


if __name__ == "__main__":
    main()

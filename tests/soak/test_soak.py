"""The short soak: mixed traffic across many continue-as-new boundaries with a worker
killed, Redis stopped and Temporal restarted; nothing acknowledged may be lost or doubled,
nothing may be left stuck, no read may go back. `make soak` runs the long one."""

from __future__ import annotations

from tests.soak.driver import Plan, soak


async def test_mixed_traffic_with_faults_loses_nothing() -> None:
    report = await soak(Plan(seconds=80, clients=32, cold_accounts=12))
    print("\n".join(report.lines()))
    assert report.problems == []
    assert report.backwards_reads == 0
    # It did cross many continue-as-new boundaries, and the faults did happen.
    assert report.runs > 20
    assert len(report.faults) == 3
    assert report.commands > 500
    assert report.unreadable > 0  # batches with an envelope that cannot be read, refused

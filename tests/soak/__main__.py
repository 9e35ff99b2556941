"""`make soak`: the long soak, SOAK_MINUTES (default 30) of mixed traffic with faults;
prints progress and a final report, and exits 1 on any lost, doubled or stuck command."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from tests.soak.driver import Plan, soak


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    minutes = float(os.environ.get("SOAK_MINUTES", "30"))
    report = asyncio.run(soak(Plan(seconds=minutes * 60, clients=64, cold_accounts=100)))
    print("\n".join(["", "soak report:", *("  " + line for line in report.lines())]))
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()

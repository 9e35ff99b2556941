"""The `tenure` console script: `tenure dev`, `tenure worker`, `tenure api`."""

from __future__ import annotations

import sys


def main() -> None:
    commands = {"dev": "deploy.dev", "worker": "workers.__main__", "api": "api.__main__"}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: tenure {{{'|'.join(commands)}}}")
    module = __import__(commands[sys.argv[1]], fromlist=["main"])
    module.main()

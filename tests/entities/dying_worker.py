"""A Tenure worker that dies at once (`os._exit`, as SIGKILL would) right after it has
delivered the command named by TENURE_TEST_DIE_AFTER (`commitReservation`), once: the
workflow task in which a saga's local tries delivered it is lost with it. Run as
`python -m tests.entities.dying_worker`, with the worker's settings in the environment."""

from __future__ import annotations

import os
import sys
from typing import Any

import workers.requests
from entities.runtime.envelope import CommandEnvelope, CommandResult
from workers.__main__ import main
from workers.delivery import CommandDelivery

DIE_AFTER = os.environ["TENURE_TEST_DIE_AFTER"]


class DyingDelivery(CommandDelivery):
    async def request(
        self, entity: Any, entity_id: str, envelope: CommandEnvelope
    ) -> CommandResult:
        result = await super().request(entity, entity_id, envelope)
        if envelope.name == DIE_AFTER:
            sys.stderr.write(f"dying after {envelope.command_id}\n")
            sys.stderr.flush()
            os._exit(9)
        return result


workers.requests.CommandDelivery = DyingDelivery  # type: ignore[attr-defined]

if __name__ == "__main__":
    main()

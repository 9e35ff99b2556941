"""Cache entries read before a request executes, handed to its resolvers through the ASGI
scope (`SCOPE_KEY`), so that a request's reads of one entity ask Redis once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from api.gateway import CacheLookup, EntityRead, Source
from workers.cache import CachedSnapshot, RawEntry, SnapshotCache

SCOPE_KEY = "tenure.prefetched_reads"


@dataclass
class PrefetchedReads:
    """Cache entries read before execution, for the resolvers to use instead of asking
    Redis again; `served` counts the reads answered from them, unchanged and not stale."""

    entries: dict[tuple[str, str], CacheLookup]
    served: int = 0

    def lookup(self, entity_type: str, entity_id: str) -> CacheLookup | None:
        return self.entries.get((entity_type, entity_id))

    def note(self, read: EntityRead | None, looked_up: CacheLookup | None) -> None:
        if (
            looked_up is not None
            and looked_up.entry is not None
            and read is not None
            and read.source is Source.CACHE
            and not read.stale
            and read.snapshot is looked_up.entry.snapshot
        ):
            self.served += 1

    @classmethod
    def parsed(
        cls, entities: list[tuple[str, str]], raw: list[RawEntry | None]
    ) -> PrefetchedReads | None:
        """The entries parsed for the resolvers; None when one cannot be read by this version
        (the resolvers then meet it themselves and answer with an error)."""
        try:
            parsed = [CachedSnapshot.from_raw(entry) if entry else None for entry in raw]
        except ValueError:
            return None
        return cls(
            {entity: CacheLookup(entry) for entity, entry in zip(entities, parsed, strict=True)}
        )


async def look_up(cache: SnapshotCache, entities: list[tuple[str, str]]) -> list[RawEntry | None]:
    """Each entity's raw cache entry, None where the cache has none."""
    if len(entities) == 1:
        return [await cache.get_raw(*entities[0])]
    return list(await asyncio.gather(*(cache.get_raw(*entity) for entity in entities)))

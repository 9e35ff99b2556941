"""Leases held in Redis: a key that holds its holder's token for a while, so that of several
processes one does a thing at a time (a subscriber's delivery, a stuck run's repair), and
that only its holder lets go: one that expired meanwhile may be another's."""

from __future__ import annotations

from workers.cache import RedisClient

_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


async def take(client: RedisClient, key: str, holder: str, seconds: float) -> bool:
    """Hold `key` for `seconds` as `holder`, if no other holds it; whether it does now
    (`holder` renewing its own lease takes it again)."""
    return bool(await client.eval(_TAKE, 1, key, holder, int(seconds * 1000)))


async def release(client: RedisClient, key: str, holder: str) -> None:
    """Let `key` go, if `holder` still holds it."""
    await client.eval(_RELEASE, 1, key, holder)

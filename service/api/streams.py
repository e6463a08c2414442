"""Per-tenant slots for long requests (event streams, generations), counted in Redis across every API process.

An event stream holds a connection and a Redis reader for as long as the job runs (hours),
so one key opening hundreds of them would starve everyone else. Each open stream holds a
slot in the tenant's `redis_keys.tenant_streams`, a sorted set of slot ids scored by when the slot
expires (Redis server time, so every API host agrees): taking a slot drops the expired
ones, refuses beyond the limit, and adds one; the stream renews its slot while it runs and
gives it back when it ends. A stream whose API process was killed cannot give its slot
back; the slot expires `SLOT_SECONDS` later.

Completions being generated are counted the same way in `redis_keys.tenant_generations`
(`StreamSlots(aredis, redis_keys.tenant_generations)`): a generation holds the inference
process's decoding capacity as a stream holds a connection.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

from service.record import redis_keys, scripts

SLOT_SECONDS = 60
"""A slot's lifetime without renewal: longer than a stream's longest wait for news (15 s)."""
RENEW_SECONDS = SLOT_SECONDS / 4


class Slot:
    """One open stream's slot: `renew()` while streaming (cheap to call often), `release()` at the end."""

    def __init__(self, slots: StreamSlots, tenant: str) -> None:
        self._slots = slots
        self.key = slots.key_of(tenant)
        self.id = secrets.token_hex(8)
        self._renewed = time.monotonic()

    async def renew(self) -> None:
        if time.monotonic() - self._renewed >= RENEW_SECONDS:
            await self._slots.take_script(keys=[self.key], args=[self.id, "", SLOT_SECONDS * 1000])
            self._renewed = time.monotonic()

    async def keep(self) -> None:
        """Renew the slot every RENEW_SECONDS until cancelled: for a request that sends nothing
        while it waits (a generation answered in one piece), which would otherwise never renew."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            await self.renew()

    async def release(self) -> None:
        await self._slots.redis.zrem(self.key, self.id)


class StreamSlots:
    """The API process's access to one kind of slot sets (one per app and kind, on its asyncio
    Redis client); `key_of` names a tenant's set (default: its event streams)."""

    def __init__(self, aredis: Any, key_of: Callable[[str], str] = redis_keys.tenant_streams) -> None:
        self.redis = aredis
        self.key_of = key_of
        self.take_script = aredis.register_script(scripts.source("take_stream_slot"))

    async def take(self, tenant: str, limit: int) -> Slot | None:
        """A slot for a new stream, or None when the tenant already holds `limit` of them."""
        slot = Slot(self, tenant)
        held = await self.take_script(keys=[slot.key], args=[slot.id, limit, SLOT_SECONDS * 1000])
        return slot if held else None

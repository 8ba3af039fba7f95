"""The v2 sessions of a RedisBroker's cluster, in Redis: writes, claims and catch-up reads.

The rules are ``model/ledger.py``'s; this module only carries them to Redis. Keys, under the
broker's prefix::

    {prefix}:session:{session_id}          hash: owner, client, role, next, trimmed, handled,
                                           since, rooms
    {prefix}:history:{session_id}          sorted set: numbered texts scored by their offset

Each write is one Lua script, so that it lands whole or not at all, and only while the writer
owns the session (the fence); a claim is one script too. Both keys expire ``ttl_ms`` after the
last write (the resume window, plus the owner's renewal period while it is connected).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.ledger import Claim, SessionRecord, Write, Written, stream_after
from steadysocket.model.routing import Publication
from steadysocket.runtime.broker import BrokerUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisSessions"]

_WRITE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[2] == '1' and not owner then
    owner = ARGV[1]
    redis.call('HSET', KEYS[1], 'owner', owner, 'client', ARGV[3], 'role', ARGV[4])
end
if not owner then return -1 end
if owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[5], 'trimmed', ARGV[6], 'handled', ARGV[7],
           'since', ARGV[9], 'rooms', ARGV[10])
for i = 12, #ARGV, 2 do redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[8]) > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8]) end
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('PEXPIRE', KEYS[2], ARGV[11])
return 1
"""
"""KEYS: the session's hash and history. ARGV: owner tag, create ('1'/'0'), client, role,
next, trimmed, handled, floor, since, rooms, ttl_ms, then (offset, text) pairs. 1 written; 0
fenced (another process owns it); -1 gone (expired, or Redis restarted empty)."""

_CLAIM = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'client', 'role')
if not f[1] then return {'unknown'} end
if f[2] ~= ARGV[1] or f[3] ~= ARGV[2] then return {'foreign'} end
if f[1] == ARGV[4] then return {'kept'} end
redis.call('HSET', KEYS[1], 'owner', ARGV[3])
return {'moved', redis.call('HGETALL', KEYS[1]),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""
"""KEYS: the session's hash and history. ARGV: client, role, the new owner tag, the tag this
process holds ('' for none)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisSessions:
    """The Redis side of the shared v2 sessions (made by a ``RedisBroker``, sharing its
    connection): the broker's :class:`~steadysocket.runtime.broker.SharedSessions`. Every
    coroutine raises :class:`~steadysocket.runtime.broker.BrokerUnavailable` when Redis cannot
    be reached."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        stream: str,
        generation: Callable[[], str | None],
        cursor: Callable[[], str],
        failures: tuple[type[BaseException], ...],
        backoff: Callable[[], BackoffStrategy],
        queued: Callable[[], int],
        wait_written: Callable[[int], Awaitable[None]],
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._stream = stream
        self._generation = generation
        self._cursor = cursor
        self._failures = failures
        self._backoff = backoff
        self._queued = queued
        self._wait_written = wait_written
        self._write_script: Callable[..., Awaitable[Any]] = redis.register_script(_WRITE)
        self._claim_script: Callable[..., Awaitable[Any]] = redis.register_script(_CLAIM)

    @property
    def epoch(self) -> str | None:
        """The cluster's epoch: Redis's generation token (None until Redis was reached once). A
        Redis restarted empty is a new epoch: no session of the old one resumes."""
        return self._generation()

    @property
    def cursor(self) -> str:
        """The stream position up to which this process's reader delivered publications."""
        return self._cursor()

    @property
    def queued(self) -> int:
        """The number (``seq``) of this process's last publication so far."""
        return self._queued()

    async def published(self, seq: int) -> None:
        """Wait until this process's publications up to ``seq`` are in the stream."""
        await self._wait_written(seq)

    def backoff(self) -> BackoffStrategy:
        """A fresh reconnect strategy (the broker's)."""
        return self._backoff()

    def _keys(self, session_id: str) -> list[str]:
        return [f"{self._prefix}:session:{session_id}", f"{self._prefix}:history:{session_id}"]

    async def write(self, writes: Sequence[Write]) -> list[Written]:
        """Carry out ``writes`` (one pipeline); what became of each."""
        try:
            return await self._write(writes)
        except self._failures as exc:
            raise BrokerUnavailable(f"writing v2 sessions: Redis unreachable ({exc})") from exc

    async def _write(self, writes: Sequence[Write]) -> list[Written]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for write in writes:
                args: list[Any] = [
                    write.owner,
                    "1" if write.create else "0",
                    write.client_id,
                    write.role,
                    write.next_offset,
                    write.trimmed_upto,
                    write.handled,
                    write.floor,
                    write.since,
                    write.rooms,
                    write.ttl_ms,
                ]
                for offset, text in write.entries:
                    args += (offset, text)
                await self._write_script(keys=self._keys(write.session_id), args=args, client=pipe)
            results = await pipe.execute()
        return [Written(int(result)) for result in results]

    async def claim(
        self, session_id: str, client_id: str, role: str, owner: str, held: str
    ) -> tuple[Claim, SessionRecord | None]:
        """Claim the session for ``owner``; ``held`` is the claim this process holds on it
        ('' for none). With ``MOVED``, the record as the store holds it.

        Raises:
            ValueError: the store's record is malformed.
        """
        try:
            reply = await self._claim_script(
                keys=self._keys(session_id), args=[client_id, role, owner, held]
            )
        except self._failures as exc:
            raise BrokerUnavailable(f"claiming a v2 session: Redis unreachable ({exc})") from exc
        outcome = Claim(_text(reply[0]))
        if outcome is not Claim.MOVED:
            return outcome, None
        flat = [_text(value) for value in reply[1]]
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        scored = [_text(value) for value in reply[2]]
        pairs = zip(scored[0::2], scored[1::2], strict=True)
        history = [(int(float(score)), text) for text, score in pairs]
        return outcome, SessionRecord.decode(session_id, fields, history)

    async def trimmed_past(self, since: str) -> bool:
        """Whether the stream dropped an entry after ``since`` (a catch-up would miss it)."""
        try:
            info = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                "XINFO", "STREAM", self._stream
            )
        except self._failures as exc:
            if "no such key" in str(exc).lower():  # no stream: nothing published, or trimmed
                return False
            raise BrokerUnavailable(f"reading the stream: Redis unreachable ({exc})") from exc
        pairs = info.items() if isinstance(info, dict) else zip(info[0::2], info[1::2], strict=True)
        values = {_text(name): value for name, value in pairs}
        # Redis 7 and later report the newest entry a trim (or XDEL) removed.
        return stream_after(_text(values.get("max-deleted-entry-id", "0-0")), since)

    async def read_after(self, since: str, count: int) -> list[tuple[str, Publication | None]]:
        """Up to ``count`` stream entries after ``since``, in order (None: malformed)."""
        try:
            entries = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                "XRANGE", self._stream, f"({since}", "+", "COUNT", count
            )
        except self._failures as exc:
            raise BrokerUnavailable(f"reading the stream: Redis unreachable ({exc})") from exc
        read: list[tuple[str, Publication | None]] = []
        for entry_id, fields in entries:
            try:
                publication: Publication | None = Publication.decode(fields)
            except ValueError:
                publication = None
            read.append((_text(entry_id), publication))
        return read

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
from steadysocket.model.ledger import STREAM_START, Claim, SessionRecord, Write, Written
from steadysocket.model.routing import Publication
from steadysocket.runtime.broker import BrokerUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisSessions"]

_WRITE = """
if redis.call('GET', KEYS[3]) ~= ARGV[12] then return -2 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[2] == '1' and not owner then
    owner = ARGV[1]
    redis.call('HSET', KEYS[1], 'owner', owner, 'client', ARGV[3], 'role', ARGV[4])
    redis.call('SET', KEYS[4], KEYS[1])
end
if not owner then return -1 end
if owner ~= ARGV[1] or redis.call('GET', KEYS[4]) ~= KEYS[1] then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[5], 'trimmed', ARGV[6], 'handled', ARGV[7],
           'since', ARGV[9], 'rooms', ARGV[10])
for i = 13, #ARGV, 2 do redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[8]) > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8]) end
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('PEXPIRE', KEYS[2], ARGV[11])
redis.call('PEXPIRE', KEYS[4], ARGV[11])
return 1
"""
"""KEYS: the session's hash and history, the generation token, the client's current session.
ARGV: owner tag, create ('1'/'0'), client, role, next, trimmed, handled, floor, since, rooms,
ttl_ms, the generation the writer knows, then (offset, text) pairs. 1 written; 0 fenced (another
process owns it, or the client opened a newer session); -1 gone (expired, or Redis restarted
empty); -2 Redis's generation is not the writer's (it restarted empty)."""

_CLAIM = """
if redis.call('GET', KEYS[3]) ~= ARGV[5] then return {'epoch'} end
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[6]) then
    return {'late'}
end
local f = redis.call('HMGET', KEYS[1], 'owner', 'client', 'role')
if not f[1] then return {'unknown'} end
if f[2] ~= ARGV[1] or f[3] ~= ARGV[2] then return {'foreign'} end
if redis.call('GET', KEYS[4]) ~= KEYS[1] then return {'unknown'} end
if f[1] == ARGV[4] then return {'kept'} end
redis.call('HSET', KEYS[1], 'owner', ARGV[3])
return {'moved', redis.call('HGETALL', KEYS[1]),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""
"""KEYS: as :data:`_WRITE`'s. ARGV: client, role, the new owner tag, the tag this process holds
('' for none), the generation the claimant knows, the claim's deadline (Redis's clock, ms): a
claim Redis runs after it (it was frozen, or the network slow) takes nothing over. A session that
is not its client's newest (the client opened another one since) is unknown, as in one process."""


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
        generation_key: str,
        resync: Callable[[], Awaitable[None]],
        wall_ms: Callable[[], float],
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
        self._generation_key = generation_key
        self._resync = resync
        self._wall_ms = wall_ms
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

    def _keys(self, session_id: str, client_id: str) -> list[str]:
        return [
            f"{self._prefix}:session:{session_id}",
            f"{self._prefix}:history:{session_id}",
            self._generation_key,
            f"{self._prefix}:client:{client_id}",
        ]

    def _known_generation(self) -> str:
        generation = self._generation()
        if generation is None:
            raise BrokerUnavailable("Redis was never reached: its generation is unknown")
        return generation

    async def _resynced(self) -> None:
        """Redis's generation is not the one this process knew: learn the new one (the reader
        then reads the new stream from its start)."""
        try:
            await self._resync()
        except self._failures as exc:
            raise BrokerUnavailable(f"re-reading Redis's generation ({exc})") from exc

    async def write(self, writes: Sequence[Write]) -> list[Written]:
        """Carry out ``writes`` (one pipeline); what became of each."""
        generation = self._known_generation()
        try:
            results = await self._write(writes, generation)
        except self._failures as exc:
            raise BrokerUnavailable(f"writing v2 sessions: Redis unreachable ({exc})") from exc
        if -2 in results:
            await self._resynced()
        return [Written(max(result, Written.GONE)) for result in results]

    async def _write(self, writes: Sequence[Write], generation: str) -> list[int]:
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
                    generation,
                ]
                for offset, text in write.entries:
                    args += (offset, text)
                keys = self._keys(write.session_id, write.client_id)
                await self._write_script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [int(result) for result in results]

    async def claim(
        self, session_id: str, client_id: str, role: str, owner: str, held: str, within_ms: float
    ) -> tuple[Claim, SessionRecord | None]:
        """Claim the session for ``owner``; ``held`` is the claim this process holds on it
        ('' for none). With ``MOVED``, the record as the store holds it. A claim that Redis runs
        more than ``within_ms`` from now (by the wall clocks) takes nothing over.

        Raises:
            BrokerUnavailable: Redis cannot be reached, or ran the claim too late.
            ValueError: the store's record is malformed.
        """
        deadline = int(self._wall_ms() + within_ms)
        generation = self._known_generation()
        try:
            reply = await self._claim_script(
                keys=self._keys(session_id, client_id),
                args=[client_id, role, owner, held, generation, deadline],
            )
        except self._failures as exc:
            raise BrokerUnavailable(f"claiming a v2 session: Redis unreachable ({exc})") from exc
        answer = _text(reply[0])
        if answer == "late":
            raise BrokerUnavailable("claiming a v2 session: Redis answered after the deadline")
        outcome = Claim(answer)
        if outcome is Claim.STALE_EPOCH:
            await self._resynced()
        if outcome is not Claim.MOVED:
            return outcome, None
        flat = [_text(value) for value in reply[1]]
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        scored = [_text(value) for value in reply[2]]
        pairs = zip(scored[0::2], scored[1::2], strict=True)
        history = [(int(float(score)), text) for text, score in pairs]
        return outcome, SessionRecord.decode(session_id, fields, history)

    async def trimmed_past(self, since: str) -> bool:
        """Whether the stream may have dropped an entry after ``since`` (a catch-up could miss
        it). ``since`` is the id of an entry that was in the stream (or its start): a trim
        drops the oldest entries first, so while that entry is still there nothing after it was
        dropped. Once it is gone this says True, also when only older ones went (the resume is
        then refused with ``trimmed``: never a silent gap)."""
        try:
            if since == STREAM_START:
                added, length = await self._added_and_length()
                return added > length
            entries = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                "XRANGE", self._stream, since, since, "COUNT", 1
            )
        except self._failures as exc:
            raise BrokerUnavailable(f"reading the stream: Redis unreachable ({exc})") from exc
        return not entries

    async def _added_and_length(self) -> tuple[int, int]:
        """How many entries the stream ever took (Redis 7's ``entries-added``), and holds."""
        try:
            info = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                "XINFO", "STREAM", self._stream
            )
        except self._failures as exc:
            if "no such key" in str(exc).lower():  # no stream yet: nothing was ever dropped
                return 0, 0
            raise
        pairs = info.items() if isinstance(info, dict) else zip(info[0::2], info[1::2], strict=True)
        values = {_text(name): value for name, value in pairs}
        length = int(values["length"])
        return int(values.get("entries-added", length)), length

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

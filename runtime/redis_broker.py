"""RedisBroker: any number of server processes, on any number of machines, through one Redis.

Install the ``steadysocket[redis]`` extra (redis-py's asyncio client). Pass one broker per
server: ``SteadyServer(broker=RedisBroker("redis://host:6379/0"))``, or
``steadysocket serve --workers N --redis URL``.

What goes through Redis, and what each part guarantees:

- **Publications** (``broadcast``, ``send_to``, ``publish`` to a room) go into one Redis
  **stream** (``{prefix}:fanout``, trimmed to about ``stream_maxlen`` entries). Each process
  reads it from the last entry it read, so a Redis reconnect loses nothing: the reader goes on
  from its cursor. The publishing process delivers to its own v1 clients at once (its v2
  sessions get its entries as they are read back: see below); every other process delivers
  each entry once (``model/routing.py``'s
  :class:`~steadysocket.model.routing.OriginDedup`, by the publisher's sequence number). A
  write retried after a lost connection may have landed already: a Lua script appends each
  publication once, by that same number, so the stream holds each publication once. Pub/Sub
  is not used at all.
- **While Redis is unreachable**: local clients are served as usual. Publications for the
  other processes wait, in order, in a bounded queue (``outgoing_limit``, default 10,000) and
  are written when Redis is back: *buffered and delivered*. Once the queue is full,
  :meth:`publish` raises :class:`~steadysocket.runtime.broker.BrokerOverflow` to the publisher
  (its local clients got the message; the other processes will not): never a silent loss.
  The broker reconnects with the project's :class:`~steadysocket.model.backoff.BackoffStrategy`.
- **Redis restarted empty** (no persistence): each process notices (a random
  ``{prefix}:generation`` token is gone) and reads the new stream from its start, so what was
  buffered during the outage is delivered. What Redis lost with its memory, entries written
  before the crash and not yet read by a process, is lost for that process (usually the last
  milliseconds before the crash; run Redis with ``appendonly yes`` to avoid it).
- **Presence**: each room is a sorted set ``{prefix}:presence:{room}`` of client ids scored
  by when their announcement expires; each process renews its members every ``refresh_ms`` and
  they expire ``ttl_ms`` after the last renewal (``PresencePolicy``), so the members of a
  process killed with ``kill -9`` disappear within ``ttl_ms``. The client count is the sum of
  each live process's own count (``{prefix}:nodes``, ``{prefix}:counts``). Both read the
  processes' wall clocks: keep them within a second or so of each other (NTP).

- **v2 sessions** live in Redis too (``runtime/redis_sessions.py``, rules in
  ``model/ledger.py``), so a v2 client whose process died resumes on any other one with nothing
  lost or doubled. The epoch is the cluster's (the generation token). Every numbered message is
  written to Redis before it goes to the socket, and every handled ``id`` before it is
  acknowledged; each resume claims its session atomically (a process that lost it can no longer
  write it); pushes reach v2 sessions through the stream (the publisher's own included), and a
  session that moved catches up on what was published while no process served it. The costs:
  a v2 delivery waits for one Redis round trip (batched), and while Redis is unreachable v2
  deliveries and resumes wait (resumes are refused with 1013, try again) instead of going out
  unrecorded. A handler whose process is killed after it returned but before its ``id`` was
  written runs again on the next process (at least once across a crash; exactly once
  otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.routing import (
    DEFAULT_OUTGOING_LIMIT,
    OriginDedup,
    Outgoing,
    PresencePolicy,
    Publication,
    Target,
)
from steadysocket.runtime.broker import BrokerOverflow, BrokerUnavailable, Node
from steadysocket.runtime.redis_sessions import RedisSessions

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisBroker"]

logger = logging.getLogger(__name__)

_EXTRA = "RedisBroker needs redis-py: pip install 'steadysocket[redis]'"
"""The error a missing redis-py gives (the module itself imports without it)."""


_APPEND = """
if tonumber(ARGV[1]) <= tonumber(redis.call('GET', KEYS[2]) or '0') then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
return 1
"""
"""Append one publication to the stream once: KEYS the stream and the publisher's last written
``seq``; ARGV ``seq``, the stream's MAXLEN, the seq key's lifetime (ms), then the fields. A
write retried after a lost reply (it may have landed) is not appended twice, so every reader,
and a session's catch-up (``model/ledger.py``), sees each publication once."""

_SEQ_TTL_MS = 24 * 3600 * 1000
"""A publisher's last written ``seq`` is kept a day after its last publication."""


def _default_backoff() -> BackoffStrategy:
    """Reconnect quickly at first, then every second at most, forever."""
    return BackoffStrategy(
        base_delays_ms=(50, 100, 200, 400, 800, 1000),
        cap_delay_ms=1000,
        jitter_ratio=0.2,
        max_attempts=1_000_000,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBroker:
    """Publications, presence and the client count of many processes, through one Redis.

    See the module docstring for what it guarantees.

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``).
        prefix: the keys' prefix; processes with the same prefix form one cluster.
        stream_maxlen: about how many publications the stream keeps for readers that lag.
        outgoing_limit: how many publications may wait while Redis is unreachable.
        presence: the presence announcements' lifetime and renewal.
        batch: at most this many publications per round trip, either way.
        backoff: makes the reconnect strategy (one per reconnecting task).
        wall_ms: the wall clock in milliseconds (presence expiry).
        node_id: this process's name in the cluster (random by default).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "steadysocket",
        stream_maxlen: int = 100_000,
        outgoing_limit: int = DEFAULT_OUTGOING_LIMIT,
        presence: PresencePolicy | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        backoff: Callable[[], BackoffStrategy] = _default_backoff,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000,
        node_id: str | None = None,
    ) -> None:
        self.url = url
        self._node_id = secrets.token_urlsafe(9) if node_id is None else node_id
        self._prefix = prefix
        self._stream = f"{prefix}:fanout"
        self._generation_key = f"{prefix}:generation"
        self._nodes_key = f"{prefix}:nodes"
        self._counts_key = f"{prefix}:counts"
        self._maxlen = stream_maxlen
        self._outgoing = Outgoing(self._node_id, outgoing_limit)
        self._dedup = OriginDedup(self._node_id)
        self.policy = PresencePolicy() if presence is None else presence
        self._batch = batch
        self._block_ms = block_ms
        self._backoff = backoff
        self._wall_ms = wall_ms
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
        except ImportError as exc:
            raise ImportError(_EXTRA) from exc
        # What an unreachable Redis raises: redis-py's ConnectionError and TimeoutError are both
        # RedisErrors; a refused connect can surface as an OSError.
        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError)
        # Our own reconnect policy, not redis-py's: no retries inside a command.
        self._redis: Redis = Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2,
            socket_timeout=block_ms / 1000 + 5,
        )
        self._node: Node | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_writer = asyncio.Event()
        self._wake_presence = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._withdraw: set[tuple[str, str]] = set()
        self._generation: str | None = None
        self._cursor = "0-0"
        self._own_read = 0
        """The last of this process's own publications read back (for its v2 sessions)."""
        self._written_seq = 0
        self._written = asyncio.Event()
        self._append: Callable[..., Awaitable[Any]] = self._redis.register_script(_APPEND)
        self._sessions = RedisSessions(
            self._redis,
            prefix,
            self._stream,
            lambda: self._generation,
            lambda: self._cursor,
            self._failures,
            backoff,
            lambda: self._outgoing.next_seq - 1,
            self._wait_written,
            self._generation_key,
            self._sync_generation,
            wall_ms,
        )
        self.reading = asyncio.Event()
        """Set while the reader is connected and has its cursor (cleared on a failure)."""
        self.published = 0
        """Publications written to Redis by this process."""
        self.delivered = 0
        """Publications of other processes delivered here."""
        self.failures = 0
        """Failed Redis round trips (each followed by a backoff delay)."""
        self.restarts_seen = 0
        """How many times Redis was found restarted empty (its generation token gone)."""

    async def _cmd(self, *args: Any) -> Any:
        """One Redis command (redis-py's ``execute_command`` is untyped)."""
        return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]

    def _room_key(self, room: str) -> str:
        return f"{self._prefix}:presence:{room}"

    # ---- the Broker interface -----------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This process's name in the cluster."""
        return self._node_id

    @property
    def shared_sessions(self) -> RedisSessions:
        """The v2 sessions of every process, in Redis (``runtime/redis_sessions.py``)."""
        return self._sessions

    @property
    def buffered(self) -> int:
        """Publications waiting to be written to Redis."""
        return len(self._outgoing)

    async def start(self, node: Node) -> None:
        """Start the reader, the writer and the presence tasks; waits for Redis at most its
        connect timeout (2 s), then goes on without it (reconnecting in the background)."""
        if self._tasks:
            raise RuntimeError("RedisBroker.start() called twice")
        self._node = node
        # One attempt now (bounded by the connect timeout), so that a server that starts
        # serving after this has its cursor; if Redis is unreachable the reader keeps trying.
        try:
            await self._sync_generation()
            self.reading.set()
        except self._failures as exc:
            logger.warning("redis unreachable at start (%s); retrying in the background", exc)
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="steadysocket-redis-reader"),
            asyncio.create_task(self._write_loop(), name="steadysocket-redis-writer"),
            asyncio.create_task(self._presence_loop(), name="steadysocket-redis-presence"),
        ]

    async def close(self) -> None:
        """Stop the tasks, withdraw this process's presence (best effort, bounded), close."""
        tasks, self._tasks = self._tasks, []
        # The flag and the wake-ups end the loops even where redis-py swallows a cancel (it
        # does inside a command it was running): each loop checks the flag on every turn.
        self._closing = True
        self._written.set()
        self._wake_writer.set()
        self._wake_presence.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if tasks and self._node is not None:
            with contextlib.suppress(*self._failures, TimeoutError):
                async with asyncio.timeout(1):
                    await self._withdraw_all(self._node)
        await self._redis.aclose()

    async def publish(self, target: Target, key: str, text: str) -> None:
        """Queue a publication for the other processes (written in order by the writer).

        Raises:
            BrokerOverflow: ``outgoing_limit`` publications already wait (Redis unreachable).
        """
        if self._outgoing.offer(target, key, text) is None:
            raise BrokerOverflow(self._outgoing.limit)
        self._flushed.clear()
        self._wake_writer.set()

    async def joined(self, room: str, client_id: str) -> None:
        """Announce the membership now (while Redis is reachable; else at the next renewal)."""
        self._withdraw.discard((room, client_id))
        expires = self.policy.expires_at(self._wall_ms())
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("ZADD", self._room_key(room), expires, client_id)
                pipe.execute_command("PEXPIRE", self._room_key(room), int(self.policy.ttl_ms))
                await pipe.execute()
        except self._failures as exc:
            logger.info(
                "presence of %s in %r: announced once Redis is back (%s)", client_id, room, exc
            )

    def left(self, room: str, client_id: str) -> None:
        """Withdraw the membership at the presence task's next round (woken now)."""
        self._withdraw.add((room, client_id))
        self._wake_presence.set()

    def clients_changed(self) -> None:
        """Announce the new count at the presence task's next round (woken now)."""
        self._wake_presence.set()

    async def presence(self, room: str) -> frozenset[str]:
        """The client ids whose announcement in ``room`` has not expired.

        Raises:
            BrokerUnavailable: Redis cannot be reached.
        """
        try:
            now = self._wall_ms()
            members = await self._cmd("ZRANGEBYSCORE", self._room_key(room), f"({now}", "+inf")
        except self._failures as exc:
            raise BrokerUnavailable(f"presence of {room!r}: Redis unreachable ({exc})") from exc
        return frozenset(_text(m) for m in members)

    async def client_count(self) -> int:
        """The sum of the live processes' counts (this process's announced first).

        Raises:
            BrokerUnavailable: Redis cannot be reached.
        """
        try:
            if self._node is not None:
                await self._announce_count(self._node)
            now = self._wall_ms()
            nodes = await self._cmd("ZRANGEBYSCORE", self._nodes_key, f"({now}", "+inf")
            if not nodes:
                return 0
            counts = await self._cmd("HMGET", self._counts_key, *nodes)
        except self._failures as exc:
            raise BrokerUnavailable(f"client count: Redis unreachable ({exc})") from exc
        return sum(int(c) for c in counts if c is not None)

    # ---- for tests and diagnostics ------------------------------------------------------

    async def wait_flushed(self) -> None:
        """Wait until every queued publication is written to Redis."""
        await self._flushed.wait()

    async def _wait_written(self, seq: int) -> None:
        """Wait until this process's publications up to ``seq`` are in Redis."""
        while self._written_seq < seq and not self._closing:
            self._written.clear()
            await self._written.wait()

    # ---- the tasks ----------------------------------------------------------------------

    async def _pause(self, strategy: BackoffStrategy, what: str, exc: BaseException) -> None:
        self.failures += 1
        delay = strategy.next_delay()
        if delay is None:  # spent: start the schedule again (a broker never gives up)
            strategy.reset()
            delay = strategy.next_delay()
            assert delay is not None
        logger.info(
            "redis %s failed (%s: %s); retrying in %.0f ms", what, type(exc).__name__, exc, delay
        )
        await asyncio.sleep(delay / 1000)

    async def _sync_generation(self) -> None:
        """Learn Redis's generation; if it changed, Redis lost its data: read from the start."""
        token = secrets.token_urlsafe(12)
        await self._cmd("SET", self._generation_key, token, "NX")
        generation = _text(await self._cmd("GET", self._generation_key))
        if self._generation is None:
            last = await self._cmd("XREVRANGE", self._stream, "+", "-", "COUNT", 1)
            self._cursor = _text(last[0][0]) if last else "0-0"
        elif generation != self._generation:
            self.restarts_seen += 1
            logger.warning("redis restarted empty: reading its new stream from the start")
            self._cursor = "0-0"
        self._generation = generation

    async def _read_loop(self) -> None:
        strategy = self._backoff()
        node = self._node
        assert node is not None
        synced = self.reading.is_set()
        while not self._closing:
            try:
                if not synced:
                    await self._sync_generation()
                    synced = True
                    self.reading.set()
                reply = await self._cmd(
                    "XREAD",
                    "COUNT",
                    self._batch,
                    "BLOCK",
                    self._block_ms,
                    "STREAMS",
                    self._stream,
                    self._cursor,
                )
            except self._failures as exc:
                self.reading.clear()
                synced = False
                await self._pause(strategy, "read", exc)
                continue
            strategy.reset()
            if not reply:
                # A blocking read that timed out: check that Redis did not restart under us
                # (a restart between two reads leaves no error on this connection).
                synced = False
                continue
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    self._cursor = _text(entry_id)
                    try:
                        publication = Publication.decode(fields)
                    except ValueError as exc:
                        logger.warning("skipped a malformed publication %s: %s", self._cursor, exc)
                        continue
                    own = publication.origin == self._node_id
                    if own:  # its v2 sessions get it now (a re-sent write only once)
                        if publication.seq <= self._own_read:
                            continue
                        self._own_read = publication.seq
                    elif not self._dedup.accept(publication):
                        continue
                    else:
                        self.delivered += 1
                    try:
                        node.deliver(publication, self._cursor, own=own)
                    except Exception:  # a bug must not stop the reader for everyone
                        logger.exception("delivering publication %s failed", self._cursor)

    async def _write_loop(self) -> None:
        strategy = self._backoff()
        while not self._closing:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while not self._closing and (batch := self._outgoing.batch(self._batch)):
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        keys = [self._stream, f"{self._prefix}:seq:{self._node_id}"]
                        for publication in batch:
                            args: list[Any] = [publication.seq, self._maxlen, _SEQ_TTL_MS]
                            for name, value in publication.encode().items():
                                args += (name, value)
                            await self._append(keys=keys, args=args, client=pipe)
                        await pipe.execute()
                except self._failures as exc:
                    await self._pause(strategy, "write", exc)
                    continue
                strategy.reset()
                self._outgoing.written(len(batch))
                self.published += len(batch)
                self._written_seq = batch[-1].seq
                self._written.set()
            self._flushed.set()

    async def _presence_loop(self) -> None:
        strategy = self._backoff()
        node = self._node
        assert node is not None
        while not self._closing:
            try:
                await self._announce(node)
            except self._failures as exc:
                await self._pause(strategy, "presence", exc)
                continue
            strategy.reset()
            # A timer sets the event rather than asyncio.timeout() around the wait: on 3.11 a
            # timeout expiring together with close()'s cancel can swallow the cancel.
            timer = asyncio.get_running_loop().call_later(
                self.policy.refresh_ms / 1000, self._wake_presence.set
            )
            try:
                await self._wake_presence.wait()
            finally:
                timer.cancel()
            self._wake_presence.clear()

    async def _announce_count(self, node: Node) -> None:
        expires = self.policy.expires_at(self._wall_ms())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("HSET", self._counts_key, self._node_id, node.local_client_count)
            pipe.execute_command("ZADD", self._nodes_key, expires, self._node_id)
            await pipe.execute()

    async def _announce(self, node: Node) -> None:
        """Renew every membership and the count; withdraw what left; drop expired entries."""
        now = self._wall_ms()
        expires = self.policy.expires_at(now)
        withdraw, self._withdraw = self._withdraw, set()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for room, client_id in withdraw:
                    if client_id not in node.rooms.members(room):
                        pipe.execute_command("ZREM", self._room_key(room), client_id)
                by_room: dict[str, list[Any]] = {}
                for room, client_id in node.rooms.memberships():
                    by_room.setdefault(room, []).extend((expires, client_id))
                for room, scored in by_room.items():
                    key = self._room_key(room)
                    pipe.execute_command("ZADD", key, *scored)
                    pipe.execute_command("PEXPIRE", key, int(self.policy.ttl_ms))
                    pipe.execute_command("ZREMRANGEBYSCORE", key, "-inf", now)
                pipe.execute_command(
                    "HSET", self._counts_key, self._node_id, node.local_client_count
                )
                pipe.execute_command("ZADD", self._nodes_key, expires, self._node_id)
                pipe.execute_command("ZREMRANGEBYSCORE", self._nodes_key, "-inf", now)
                await pipe.execute()
        except BaseException:
            self._withdraw |= withdraw
            raise

    async def _withdraw_all(self, node: Node) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for room, client_id in node.rooms.memberships():
                pipe.execute_command("ZREM", self._room_key(room), client_id)
            pipe.execute_command("ZREM", self._nodes_key, self._node_id)
            pipe.execute_command("HDEL", self._counts_key, self._node_id)
            await pipe.execute()

"""Tools for testing your own application against a server and a link that fail on cue.

Two ways to make a connection misbehave, both usable from any test runner:

- **In memory, on virtual time.** :class:`InMemoryServer` is a scripted fake server that the
  manager reaches through ``opener=server.open``, with no socket; :class:`VirtualClock` is the
  manager's clock and sleep, so backoff waits, heartbeats and timeouts pass only when the test
  calls :meth:`VirtualClock.advance`. Deterministic, and a minute of reconnecting takes
  milliseconds::

      clock = VirtualClock()
      server = InMemoryServer(clock, Script.accept(echo=True))
      manager = WebSocketManager(
          server.url, opener=server.open, clock=clock, sleep=clock.sleep, environ={}
      )
      await manager.connect()
      await clock.run_until_idle()          # open: the hello arrived
      await server.drop()                   # the link drops without a close frame
      await clock.advance(30)               # the backoff passes; the manager reconnects

- **Over loopback, on real time.** :class:`LoopbackServer` runs the same :class:`Script` on a
  real ``websockets`` server on 127.0.0.1, for the manager's real opener; :class:`FaultProxy`
  is a TCP proxy you put in front of any server (a ``SteadyServer`` on port 0 works well) that
  drops, resets, stalls, slows or flaps the link (:class:`Mode`, :class:`Flap`).

A :class:`Script` says what a scripted server does with each new connection
(:class:`ScriptMode`: accept, send a late or bad hello, close, drop, reject with an HTTP status,
refuse, hang, go silent); ``await server.set_script(...)`` switches it at any time, and
``server.close()``, ``server.drop()``, ``server.ping()`` and ``server.send()`` act on the open
connection. Both scripted servers record every attempt (:class:`AttemptRecord`) and every
connection (:class:`ConnectionRecord`: the frames each way, how and by whom it ended).

The scripted servers speak protocol version 1 (a client asking for version 2 is closed with
4400). :meth:`VirtualClock.settle`, and so the whole virtual clock, needs asyncio's own event
loop (it reads a CPython implementation detail; see there).
"""

from __future__ import annotations

from ._clock import ClockEntry, SleepRecord, VirtualClock
from ._faultproxy import CHUNK as CHUNK
from ._faultproxy import QUEUE_CHUNKS as QUEUE_CHUNKS
from ._faultproxy import FaultProxy, Flap, Mode
from ._scripted import (
    LATE_HELLO_OWNER,
    AttemptRecord,
    ConnectionRecord,
    ConnState,
    InMemoryServer,
    LoopbackServer,
    MemoryTransport,
    Script,
    ScriptedServer,
    ScriptMode,
)

__all__ = [
    "LATE_HELLO_OWNER",
    "AttemptRecord",
    "ClockEntry",
    "ConnState",
    "ConnectionRecord",
    "FaultProxy",
    "Flap",
    "InMemoryServer",
    "LoopbackServer",
    "MemoryTransport",
    "Mode",
    "Script",
    "ScriptMode",
    "ScriptedServer",
    "SleepRecord",
    "VirtualClock",
]

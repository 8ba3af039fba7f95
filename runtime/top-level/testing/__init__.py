"""Tools for testing your own application against a server and a link that fail on cue.

The fault proxy:

- :class:`FaultProxy` is a TCP proxy on 127.0.0.1 between your client and a real server; it
  drops, resets, stalls, slows or flaps the link when told to (:class:`Mode`, :class:`Flap`).
"""

from __future__ import annotations

from ._faultproxy import CHUNK as CHUNK
from ._faultproxy import QUEUE_CHUNKS as QUEUE_CHUNKS
from ._faultproxy import FaultProxy, Flap, Mode

__all__ = ["FaultProxy", "Flap", "Mode"]

"""The fault proxy moved to :mod:`steadysocket.testing`; this name is kept for old imports."""

from steadysocket.testing import CHUNK, QUEUE_CHUNKS, FaultProxy, Flap, Mode

__all__ = ["CHUNK", "QUEUE_CHUNKS", "FaultProxy", "Flap", "Mode"]

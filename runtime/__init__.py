"""steadysocket.runtime: asyncio adapters that carry out what steadysocket.model decides.

``WebSocketManager``, ``WSError``, ``ServerError``, ``ManagerClosed`` (``runtime.manager``),
``SteadyServer`` and ``Client`` (``runtime.server``) and ``SteadyASGI`` (``runtime.asgi``) can be
imported from here. They load on first use, so ``import steadysocket.runtime`` (and the
``steadysocket diagrams`` command) does not pay for the websockets stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadysocket.runtime.asgi import SteadyASGI
    from steadysocket.runtime.manager import ManagerClosed, ServerError, WebSocketManager, WSError
    from steadysocket.runtime.server import Client, SteadyServer

__all__ = [
    "Client",
    "ManagerClosed",
    "ServerError",
    "SteadyASGI",
    "SteadyServer",
    "WSError",
    "WebSocketManager",
]

_HOME = {
    "Client": "steadysocket.runtime.server",
    "ManagerClosed": "steadysocket.runtime.manager",
    "ServerError": "steadysocket.runtime.manager",
    "SteadyASGI": "steadysocket.runtime.asgi",
    "SteadyServer": "steadysocket.runtime.server",
    "WSError": "steadysocket.runtime.manager",
    "WebSocketManager": "steadysocket.runtime.manager",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

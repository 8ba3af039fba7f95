"""steadysocket: WebSocket connections that stay up, and that can show why they went down.

The names most programs need, importable from here::

    from steadysocket import WebSocketManager, Phase, BackoffStrategy

Client side: ``WebSocketManager``, its snapshot ``WSState`` and ``Phase``, the errors it reports
(``WSError``, ``ServerError``) and ``BackoffStrategy``. Server side: ``SteadyServer``, the ASGI
application ``SteadyASGI`` and the ``Client`` that handlers receive. ``steadysocket.testing`` has
tools for your own tests. Each name loads on first use, so ``import steadysocket`` stays light.

(The files of this package live in ``runtime/top-level/`` of the source tree; pyproject.toml maps
them to ``steadysocket``. ``steadysocket.model`` and ``steadysocket.runtime`` are ``model/`` and
``runtime/``.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadysocket.model.backoff import BackoffStrategy
    from steadysocket.model.snapshot import Phase, WSState
    from steadysocket.runtime.asgi import SteadyASGI
    from steadysocket.runtime.manager import ManagerClosed, ServerError, WebSocketManager, WSError
    from steadysocket.runtime.server import Client, SteadyServer

    __version__: str

__all__ = [
    "BackoffStrategy",
    "Client",
    "ManagerClosed",
    "Phase",
    "ServerError",
    "SteadyASGI",
    "SteadyServer",
    "WSError",
    "WSState",
    "WebSocketManager",
    "__version__",
]

_HOME = {
    "BackoffStrategy": "steadysocket.model.backoff",
    "Client": "steadysocket.runtime.server",
    "ManagerClosed": "steadysocket.runtime.manager",
    "Phase": "steadysocket.model.snapshot",
    "ServerError": "steadysocket.runtime.manager",
    "SteadyASGI": "steadysocket.runtime.asgi",
    "SteadyServer": "steadysocket.runtime.server",
    "WSError": "steadysocket.runtime.manager",
    "WSState": "steadysocket.model.snapshot",
    "WebSocketManager": "steadysocket.runtime.manager",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steadysocket")
    except PackageNotFoundError:  # only when the source tree is imported without installing it
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""The public names: ``from steadysocket import ...``, ``steadysocket.runtime.X``,
``steadysocket.model.X``, ``steadysocket.__version__`` and ``steadysocket.testing``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import steadysocket
import steadysocket.model
import steadysocket.runtime
import steadysocket.testing
from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime import faultproxy
from steadysocket.runtime.asgi import SteadyASGI
from steadysocket.runtime.manager import ManagerClosed, ServerError, WebSocketManager, WSError
from steadysocket.runtime.server import Client, SteadyServer

HOMES: dict[str, object] = {
    "WebSocketManager": WebSocketManager,
    "SteadyServer": SteadyServer,
    "SteadyASGI": SteadyASGI,
    "Client": Client,
    "BackoffStrategy": BackoffStrategy,
    "Phase": Phase,
    "WSState": WSState,
    "WSError": WSError,
    "ServerError": ServerError,
    "ManagerClosed": ManagerClosed,
}


def python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; returns what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("name", sorted(HOMES))
def test_the_top_level_names_are_the_classes_of_their_modules(name: str) -> None:
    assert getattr(steadysocket, name) is HOMES[name]
    assert name in steadysocket.__all__


def test_the_issue_names_import_from_the_top_level() -> None:
    namespace: dict[str, object] = {}
    exec(
        "from steadysocket import WebSocketManager, SteadyServer, SteadyASGI, Client, "
        "BackoffStrategy, Phase, WSState, WSError, ServerError",
        namespace,
    )
    assert namespace["WebSocketManager"] is WebSocketManager
    assert namespace["ServerError"] is ServerError


def test_the_version_is_the_installed_distributions() -> None:
    assert steadysocket.__version__ == importlib.metadata.version("steadysocket")
    assert steadysocket.__version__.startswith("0.")


def test_the_subpackages_name_their_main_classes_too() -> None:
    assert steadysocket.runtime.WebSocketManager is WebSocketManager
    assert steadysocket.runtime.SteadyServer is SteadyServer
    assert steadysocket.model.BackoffStrategy is BackoffStrategy
    assert steadysocket.model.Phase is Phase


@pytest.mark.parametrize("module", [steadysocket, steadysocket.runtime, steadysocket.model])
def test_every_name_in_all_exists_and_dir_lists_it(module: object) -> None:
    names: list[str] = module.__all__  # type: ignore[attr-defined]
    assert names
    for name in names:
        assert getattr(module, name) is not None
    assert set(names) <= set(dir(module))


@pytest.mark.parametrize("module", [steadysocket, steadysocket.runtime])
def test_an_unknown_name_is_an_attribute_error(module: object) -> None:
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        getattr(module, "NoSuchThing")  # noqa: B009


def test_import_steadysocket_loads_neither_websockets_nor_the_runtime() -> None:
    printed = python(
        "import sys, steadysocket\n"
        "print(sorted(m for m in ('websockets', 'steadysocket.runtime.manager',"
        " 'steadysocket.runtime.server', 'steadysocket.runtime.asgi') if m in sys.modules))"
    )
    assert printed.strip() == "[]"


def test_steady_asgi_needs_no_web_framework() -> None:
    # SteadyASGI speaks raw ASGI 3; the [asgi] extra only adds Starlette for mounting it.
    printed = python(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'fastapi'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from steadysocket import SteadyASGI\n"
        "print(SteadyASGI.__name__, 'starlette' in sys.modules)"
    )
    assert printed.strip() == "SteadyASGI False"


def test_the_fault_proxy_lives_in_testing_and_keeps_its_old_name() -> None:
    assert steadysocket.testing.FaultProxy is faultproxy.FaultProxy
    assert steadysocket.testing.Mode is faultproxy.Mode
    assert steadysocket.testing.Flap is faultproxy.Flap
    assert {"FaultProxy", "Flap", "Mode"} <= set(steadysocket.testing.__all__)

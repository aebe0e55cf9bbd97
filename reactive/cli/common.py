"""What the commands share: errors, where NATS is, connecting, reading the announcements, tables,
executions read as plain JSON."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reactive import NatsBackend
    from reactive.meta import WorkflowInfo

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_META_BUCKET",
    "DEFAULT_URL",
    "STATUSES",
    "TERMINAL",
    "URL_ENV",
    "URL_FILE",
    "CLIError",
    "LoadError",
    "Out",
    "UsageError",
    "add_connection_args",
    "age_of",
    "announced_workflows",
    "connect",
    "connect_options",
    "decode_state",
    "format_age",
    "format_time",
    "last_step",
    "no_workflows_error",
    "or_dash",
    "parse_time",
    "print_line",
    "quiet_tls_chatter",
    "resolve_url",
    "split_urls",
    "table",
    "unknown_workflow_error",
    "unreachable_error",
]

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_DATA_DIR = ".reactive-data"
DEFAULT_META_BUCKET = "REACTIVE_META"
URL_ENV = "REACTIVE_NATS_URL"
URL_FILE = "nats.url"


class CLIError(Exception):
    """A problem worth a clear message on stderr and a non-zero exit, not a traceback."""

    exit_code = 1

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.reasons = list(reasons)


class UsageError(CLIError):
    """The command's arguments or input are wrong, and nothing was done: exit status 2
    (argparse's for a bad option), whatever the command's other failures exit with."""

    exit_code = 2


class LoadError(CLIError):
    """A target (``module:Workflow``, ``file.py:Workflow``) that cannot be loaded."""


# --------------------------------------------------------------------------- options


def add_connection_args(parser: argparse.ArgumentParser, *, client: bool = True) -> None:
    """``--nats-url``, credentials, TLS and (for client commands) ``--data-dir`` and ``--meta-bucket``."""
    env = os.environ.get
    group = parser.add_argument_group("NATS connection")
    group.add_argument(
        "--nats-url",
        metavar="URL",
        default=None,
        help=(
            "the NATS server (or several, comma-separated, for a cluster); default: "
            f"${URL_ENV}, else "
            + (
                f"the URL a running `serve` wrote into <data-dir>/{URL_FILE}, else {DEFAULT_URL}"
                if client
                else "start an embedded nats-server"
            )
        ),
    )
    group.add_argument(
        "--creds",
        metavar="FILE",
        default=env("REACTIVE_NATS_CREDS"),
        help="a NATS credentials file (JWT and NKey seed) ($REACTIVE_NATS_CREDS)",
    )
    group.add_argument(
        "--user", default=env("REACTIVE_NATS_USER"), help="user name ($REACTIVE_NATS_USER)"
    )
    group.add_argument(
        "--password",
        default=env("REACTIVE_NATS_PASSWORD"),
        help="password ($REACTIVE_NATS_PASSWORD)",
    )
    group.add_argument(
        "--token", default=env("REACTIVE_NATS_TOKEN"), help="auth token ($REACTIVE_NATS_TOKEN)"
    )
    group.add_argument(
        "--tls-ca", metavar="FILE", default=None, help="CA certificates to verify the server with"
    )
    group.add_argument(
        "--tls-cert", metavar="FILE", default=None, help="client certificate (with --tls-key)"
    )
    group.add_argument("--tls-key", metavar="FILE", default=None, help="client private key")
    group.add_argument(
        "--tls-hostname",
        metavar="NAME",
        default=None,
        help="the server name to verify the certificate against (default: from the URL)",
    )
    group.add_argument(
        "--connect-attempts",
        type=int,
        default=3,
        metavar="N",
        help="give up connecting after N tries (default: 3)",
    )
    if client:
        group.add_argument(
            "--data-dir",
            default=DEFAULT_DATA_DIR,
            metavar="DIR",
            help=(
                f"where a local `serve` keeps its embedded server, for its {URL_FILE} "
                f"(default: {DEFAULT_DATA_DIR})"
            ),
        )
        group.add_argument(
            "--meta-bucket",
            default=DEFAULT_META_BUCKET,
            metavar="BUCKET",
            help=f"the bucket where engines announce their workflows (default: {DEFAULT_META_BUCKET})",
        )


def split_urls(url: str) -> str | list[str]:
    """``a,b`` is a cluster: a list of server URLs."""
    parts = [u.strip() for u in url.split(",") if u.strip()]
    if not parts:
        raise CLIError(f"no NATS URL in {url!r}")
    return parts[0] if len(parts) == 1 else parts


def resolve_url(args: argparse.Namespace) -> str:
    """``--nats-url``, else ``$REACTIVE_NATS_URL``, else ``<data-dir>/nats.url``, else the default."""
    if args.nats_url:
        return str(args.nats_url)
    from_env = os.environ.get(URL_ENV, "").strip()
    if from_env:
        return from_env
    url_file = Path(getattr(args, "data_dir", DEFAULT_DATA_DIR)) / URL_FILE
    with contextlib.suppress(OSError):
        written = url_file.read_text().strip()
        if written:
            return written
    return DEFAULT_URL


class _TLSChatter(logging.Filter):
    """asyncio's "returning true from eof_received() has no effect when using ssl".

    nats-py's protocol says so on every TLS connection the server closes (each
    failed attempt, each reconnect): noise next to the one error the command reports.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("returning true from eof_received()")


def quiet_tls_chatter() -> None:
    """Drop asyncio's warning about nats-py's TLS protocol (see _TLSChatter)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _TLSChatter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_TLSChatter())


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """nats-py connect options from the credential and TLS arguments."""
    options: dict[str, Any] = {}
    if args.creds:
        creds = Path(args.creds)
        if not creds.is_file():
            raise CLIError(f"credentials file not found: {creds}")
        options["user_credentials"] = str(creds)
    if args.user:
        options["user"] = args.user
    if args.password:
        if not args.user:
            raise CLIError("--password needs --user")
        options["password"] = args.password
    if args.token:
        options["token"] = args.token
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise CLIError("--tls-cert and --tls-key go together")
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca)
            if args.tls_cert:
                context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise CLIError(f"cannot load the TLS files: {e}") from e
        options["tls"] = context
    if args.tls_hostname:
        options["tls_hostname"] = args.tls_hostname
    return options


# --------------------------------------------------------------------------- connecting


def unreachable_error(url: str, error: BaseException) -> CLIError:
    """Connecting to ``url`` failed with ``error``: the message, and the hint for that error."""
    text = str(error).lower()
    if isinstance(error, ssl.SSLError):
        hints = [
            "the server's certificate was not trusted: give the CA that signed it with "
            "--tls-ca (and --tls-hostname if it names another host)",
        ]
    elif "authorization" in text or "authentication" in text:
        hints = ["the server refused the credentials: check --user/--password, --token or --creds"]
    else:
        hints = [
            "is a server running there? `python -m reactive serve module:Workflow` starts one "
            "(with no --nats-url it runs an embedded nats-server)",
            f"point at another with --nats-url or ${URL_ENV}",
        ]
    return CLIError(f"cannot connect to NATS at {url}: {error}", hints)


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace, url: str | None = None) -> AsyncIterator[NatsBackend]:
    """A started NatsBackend for a client command; a clear CLIError when the server is unreachable."""
    import anyio

    from reactive import NatsBackend
    from reactive.errors import BackendError

    url = url or resolve_url(args)
    backend = NatsBackend(
        split_urls(url),
        connect_options=connect_options(args),
        initial_connect_attempts=max(1, args.connect_attempts),
    )
    try:
        await backend.start()
    except BackendError as e:
        raise unreachable_error(url, e.__cause__ or e) from e
    except OSError as e:
        raise unreachable_error(url, e) from e
    try:
        yield backend
    except BackendError as e:
        hints = ["does the server have JetStream enabled (nats-server -js)?"]
        raise CLIError(f"NATS at {url}: {e}", hints if "JetStream" in str(e) else []) from e
    finally:
        with anyio.move_on_after(5.0, shield=True):
            await backend.close()


async def announced_workflows(backend: NatsBackend, meta_bucket: str) -> dict[str, WorkflowInfo]:
    """Every workflow an engine announced at ``wf.<id>`` in the meta bucket, by id."""
    import msgspec

    from reactive.errors import NotFoundError
    from reactive.meta import WorkflowInfo

    try:
        keys = await backend.kv_keys(meta_bucket, "wf.*")
    except NotFoundError:
        return {}
    found: dict[str, WorkflowInfo] = {}
    for key in keys:
        entry = await backend.kv_get(meta_bucket, key)
        if entry is None:
            continue
        try:
            info = msgspec.json.decode(entry.value, type=WorkflowInfo)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        found[info.id] = info
    return found


def no_workflows_error(url: str, meta_bucket: str) -> CLIError:
    return CLIError(
        f"no workflow is announced in {meta_bucket} at {url}",
        ["start one with `python -m reactive serve module:Workflow` (it announces what it serves)"],
    )


def unknown_workflow_error(wf_id: str, known: Sequence[str], meta_bucket: str) -> CLIError:
    hint = f"announced: {', '.join(sorted(known))}" if known else "no workflow is announced"
    return CLIError(
        f"workflow {wf_id!r} is not announced in {meta_bucket} ({hint})",
        ["is `python -m reactive serve` running it against this server?"],
    )


# --------------------------------------------------------------------------- formatting


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Plain aligned columns, two spaces apart; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def parse_time(value: Any) -> datetime | None:
    """A timestamp from a state decoded as plain JSON (RFC 3339 text), or None."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(value: datetime | None, *, date: bool = True) -> str:
    """UTC, to the millisecond: ``2024-05-01 12:00:00.123Z`` (or only the time of day)."""
    if value is None:
        return "-"
    utc = value.astimezone(UTC)
    text = f"{utc:%H:%M:%S}.{utc.microsecond // 1000:03d}"
    return f"{utc:%Y-%m-%d} {text}Z" if date else text


def format_age(seconds: float) -> str:
    """A duration as a person reads it: ``3s``, ``5m``, ``2h``, ``4d``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def age_of(value: datetime | None, now: float | None = None) -> str:
    if value is None:
        return "-"
    return format_age((now if now is not None else time.time()) - value.timestamp())


# --------------------------------------------------------------------------- executions, as plain JSON


TERMINAL = ("completed", "failed", "escalated", "timed_out", "cancelled")
STATUSES = ("pending", "running", "waiting", *TERMINAL)

Out = Callable[[str], None]  # where a command prints its lines (tests collect them)


def print_line(line: str) -> None:
    print(line, flush=True)


def decode_state(value: bytes) -> dict[str, Any] | None:
    """A stored state as plain JSON; None if it is not a JSON object."""
    import msgspec

    try:
        state = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return None
    return state if isinstance(state, dict) else None


def or_dash(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


def last_step(state: dict[str, Any]) -> str:
    """The last timeline entry's rule and action, e.g. ``review publish_async``."""
    timeline = state.get("timeline") or []
    if not timeline or not isinstance(timeline[-1], dict):
        return ""
    last = timeline[-1]
    rule = last.get("rule_id") or "-"
    action = last.get("action") or ""
    return f"{rule} {action}".strip()

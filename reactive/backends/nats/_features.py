"""What the engine uses of nats-server, by the version that brought it, and the check of a
connected server against it."""

from __future__ import annotations

from typing import Any, Final

from nats.aio.client import Client

from reactive.errors import ServerFeatureError, TransientBackendError

__all__ = ["MIN_SERVER_VERSION", "REQUIRED_FEATURES", "check_server"]

# What the engine uses of nats-server, by the version that brought it.
REQUIRED_FEATURES: Final[tuple[tuple[tuple[int, int, int], str], ...]] = (
    ((2, 10, 0), "multi-filter consumers and subject transforms"),
    ((2, 11, 0), "per-message TTLs, for a workflow's retention= (ADR-43)"),
    ((2, 12, 0), "message schedules, where deadlines and timeouts live (ADR-51)"),
)
MIN_SERVER_VERSION: Final = max(v for v, _ in REQUIRED_FEATURES)


def check_server(nc: Client) -> None:
    """Refuse a server that lacks what the engine uses: JetStream, and the features of
    REQUIRED_FEATURES (ServerFeatureError naming each, with the version that has it)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    if not info.get("jetstream"):
        # (Transient: a server restarted with -js on the same URL heals it.)
        raise TransientBackendError(
            "JetStream is not enabled on the server (start nats-server with -js)"
        )
    found = nc.connected_server_version
    have = (found.major, found.minor, found.patch)
    missing = [f"{what} (nats-server {v[0]}.{v[1]}+)" for v, what in REQUIRED_FEATURES if have < v]
    if missing:
        raise ServerFeatureError(
            f"nats-server {have[0]}.{have[1]}.{have[2]} lacks what the engine uses: {'; '.join(missing)}; "
            f"upgrade it to {'.'.join(map(str, MIN_SERVER_VERSION))} or later"
        )

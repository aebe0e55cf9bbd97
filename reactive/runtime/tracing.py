"""OpenTelemetry spans, with trace context carried in NATS headers (``traceparent``).

One execution forms one trace: the execution's state keeps the trace context it
started with, so every later trigger (a KV change, a timer, a callback whose
worker did not propagate the context) continues that trace; a message or a
callback that carries ``traceparent`` continues the sender's.

When no tracer provider is configured (the OpenTelemetry API's default), the
engine skips all of this: tracing costs nothing unless it is turned on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import ProxyTracerProvider, Span, SpanKind

__all__ = [
    "Tracing",
    "configure_from_env",
    "tracing_configured",
]

_TRACER_NAME = "reactive"


def tracing_configured() -> bool:
    """Whether an application installed a real tracer provider."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, ProxyTracerProvider | trace.NoOpTracerProvider)


class Tracing:
    """The engine's spans; every method is a no-op when ``enabled`` is False."""

    def __init__(self, enabled: bool, provider: trace.TracerProvider | None = None) -> None:
        self.enabled = False
        self._tracer: trace.Tracer | None = None
        self.configure(enabled, provider)

    def configure(self, enabled: bool, provider: trace.TracerProvider | None = None) -> None:
        """Turn spans on or off, in place (whoever holds this object sees the change)."""
        self.enabled = enabled
        self._tracer = trace.get_tracer(_TRACER_NAME, tracer_provider=provider) if enabled else None

    def parent_from(self, headers: Mapping[str, str] | None, traceparent: str = "") -> Any:
        """The context to continue: the headers' if they carry one, else the stored traceparent."""
        if not self.enabled:
            return None
        if headers and "traceparent" in headers:
            return propagate.extract(dict(headers))
        if traceparent:
            return propagate.extract({"traceparent": traceparent})
        return None

    @contextmanager
    def span(
        self,
        name: str,
        *,
        parent: Any = None,
        kind: SpanKind = SpanKind.INTERNAL,
        **attributes: Any,
    ) -> Iterator[Span | None]:
        if self._tracer is None:
            yield None
            return
        attrs = {f"reactive.{k}": v for k, v in attributes.items() if v is not None and v != ""}
        with self._tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=attrs
        ) as span:
            yield span

    def start(self, name: str, **attributes: Any) -> Span | None:
        """A child span of the current one that the caller ends (it does not become current)."""
        if self._tracer is None:
            return None
        attrs = {f"reactive.{k}": v for k, v in attributes.items() if v is not None and v != ""}
        return self._tracer.start_span(name, attributes=attrs)

    def child(self, name: str, **attributes: Any) -> Any:
        """A child of the current span (or nothing when tracing is off)."""
        if self._tracer is None:
            return nullcontext()
        return self.span(name, **attributes)

    def headers(self) -> dict[str, str]:
        """The current trace context as NATS headers ({} when tracing is off)."""
        if not self.enabled:
            return {}
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=otel_context.get_current())
        return carrier

    def traceparent(self) -> str:
        return self.headers().get("traceparent", "")


def configure_from_env() -> bool:
    """Install an SDK tracer provider with an OTLP exporter when the standard OTEL_* variables ask for one.

    Returns whether tracing was turned on. Honoured: ``OTEL_TRACES_EXPORTER``
    (``otlp`` or ``console``; ``none`` turns it off), and
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    (which imply ``otlp``). ``OTEL_SERVICE_NAME`` names the service.
    """
    import os

    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name == "none" or (not exporter_name and not endpoint):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as e:  # pragma: no cover - depends on an optional package
            raise RuntimeError(
                "OTLP tracing was asked for by OTEL_* variables, but the exporter is not installed: "
                "pip install opentelemetry-exporter-otlp-proto-http"
            ) from e
        exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "reactive")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True

"""Cold-storage monitoring: alerts on the readings sensors write into a KV bucket.

Each storage unit's sensors write its latest reading into the entity-state
bucket ``COLD_STORAGE`` at key ``unit.<unit-id>`` (a ``UnitReading``:
temperature, humidity, pressure, and the unit's limits, all with defaults).
The workflow does not own that state: it watches the bucket
(``watch_kv="unit.*", bucket="COLD_STORAGE"``) and three rules publish an
alert when a reading is out of range:

* ``temperature_alert``: warmer than the unit's ``max_temperature``;
* ``humidity_alert``: more humid than ``max_humidity``;
* ``pressure_alert``: further than ``pressure_tolerance`` from ``nominal_pressure``
  (a door left open, a failing pressure-relief valve).

They are ``publish=`` rules without ``mutate``, so they never write the
readings; each fires at most once per revision, however many engine
processes run. Each has a ``cooldown``: while a unit stays out of range it is
alerted at most once per cooldown per metric; a reading still out of range
when the cooldown ends is alerted then.

``sensor`` is a simulated sensor: it writes a series of readings for one unit.

Run it::

    python -m reactive demo examples/cold_storage.py
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import anyio
import msgspec
from anyio.abc import TaskStatus

from reactive import Engine, ExecutionState, RuleContext, Workflow, rule
from reactive.backends.base import Backend
from reactive.conditions import condition

BUCKET = "COLD_STORAGE"
ALERTS = "alerts.cold-storage"  # alerts go to alerts.cold-storage.<metric>
COOLDOWN = "10m"


def unit_key(unit_id: str) -> str:
    return f"unit.{unit_id}"


# --------------------------------------------------------------------------- types


class UnitReading(ExecutionState):
    """The latest reading of one storage unit, with its limits (defaults: a 2-8 °C chiller)."""

    unit_id: str = ""
    temperature: float = 4.0  # °C
    humidity: float = 60.0  # % relative humidity
    pressure: float = 101.3  # kPa
    read_at: datetime | None = None
    max_temperature: float = 8.0
    max_humidity: float = 85.0
    nominal_pressure: float = 101.3
    pressure_tolerance: float = 1.5


class Alert(msgspec.Struct, kw_only=True):
    unit_id: str
    metric: str
    value: float
    limit: str
    message: str
    at: datetime
    revision: int


# --------------------------------------------------------------------------- the workflow


@condition
def too_warm(ctx: RuleContext[UnitReading, None]) -> bool:
    return ctx.state.temperature > ctx.state.max_temperature


@condition
def too_humid(ctx: RuleContext[UnitReading, None]) -> bool:
    return ctx.state.humidity > ctx.state.max_humidity


@condition
def pressure_off(ctx: RuleContext[UnitReading, None]) -> bool:
    st = ctx.state
    return abs(st.pressure - st.nominal_pressure) > st.pressure_tolerance


def _alert(
    ctx: RuleContext[UnitReading, None], metric: str, value: float, limit: str, what: str
) -> Alert:
    st = ctx.state
    unit = st.unit_id or ctx.key.removeprefix("unit.")
    return Alert(
        unit_id=unit,
        metric=metric,
        value=value,
        limit=limit,
        message=f"{unit}: {what}",
        at=datetime.fromtimestamp(ctx.now, UTC),
        revision=ctx.revision,
    )


class ColdStorageMonitor(Workflow, id="cold-storage", state=UnitReading, bucket=BUCKET):
    """Alerts on cold-storage units whose readings leave their limits."""

    @rule(
        watch_kv="unit.*",
        bucket=BUCKET,
        when=too_warm,
        publish=f"{ALERTS}.temperature",
        cooldown=COOLDOWN,
    )
    def temperature_alert(self, ctx: RuleContext[UnitReading, None]) -> Alert:
        st = ctx.state
        return _alert(
            ctx,
            "temperature",
            st.temperature,
            f"<= {st.max_temperature:g} °C",
            f"temperature {st.temperature:g} °C above {st.max_temperature:g} °C",
        )

    @rule(
        watch_kv="unit.*",
        bucket=BUCKET,
        when=too_humid,
        publish=f"{ALERTS}.humidity",
        cooldown=COOLDOWN,
    )
    def humidity_alert(self, ctx: RuleContext[UnitReading, None]) -> Alert:
        st = ctx.state
        return _alert(
            ctx,
            "humidity",
            st.humidity,
            f"<= {st.max_humidity:g} %",
            f"humidity {st.humidity:g} % above {st.max_humidity:g} %",
        )

    @rule(
        watch_kv="unit.*",
        bucket=BUCKET,
        when=pressure_off,
        publish=f"{ALERTS}.pressure",
        cooldown=COOLDOWN,
    )
    def pressure_alert(self, ctx: RuleContext[UnitReading, None]) -> Alert:
        st = ctx.state
        return _alert(
            ctx,
            "pressure",
            st.pressure,
            f"{st.nominal_pressure:g} ± {st.pressure_tolerance:g} kPa",
            f"pressure {st.pressure:g} kPa, {st.pressure - st.nominal_pressure:+.1f} kPa from nominal",
        )


WORKFLOWS: list[type[Workflow]] = [ColdStorageMonitor]


# --------------------------------------------------------------------------- the simulated sensors


async def write_reading(backend: Backend, reading: UnitReading) -> int:
    """Write one reading as a sensor does (a plain put: the sensor owns the key). Returns the revision."""
    return await backend.kv_put(BUCKET, unit_key(reading.unit_id), msgspec.json.encode(reading))


async def sensor(
    backend: Backend,
    unit_id: str,
    readings: Sequence[tuple[float, float, float]],
    *,
    interval: float = 0.05,
) -> None:
    """Write ``readings`` (temperature, humidity, pressure) for one unit, ``interval`` seconds apart."""
    await backend.ensure_bucket(BUCKET)
    for i, (temperature, humidity, pressure) in enumerate(readings):
        if i:
            await anyio.sleep(interval)
        reading = UnitReading(
            unit_id=unit_id,
            temperature=temperature,
            humidity=humidity,
            pressure=pressure,
            read_at=datetime.now(UTC),
        )
        await write_reading(backend, reading)


# --------------------------------------------------------------------------- the demo

#: Per unit, its readings (temperature °C, humidity %, pressure kPa).
DEMO_READINGS: dict[str, list[tuple[float, float, float]]] = {
    # Everything in range: no alert.
    "freezer-a": [(3.5, 58.0, 101.3), (3.8, 59.0, 101.2), (4.1, 60.0, 101.3)],
    # The compressor is failing: warmer and warmer; one temperature alert (cooldown).
    "chiller-b": [(5.0, 62.0, 101.3), (8.6, 63.0, 101.3), (9.4, 63.0, 101.2), (10.2, 64.0, 101.3)],
    # The door was left open: humid air and a pressure drop; one alert each.
    "dock-c": [(5.5, 70.0, 101.2), (6.5, 88.0, 99.4), (7.0, 91.0, 99.1), (7.2, 92.0, 99.0)],
}

#: The alerts the demo expects: (unit, metric), each exactly once.
EXPECTED_ALERTS = {("chiller-b", "temperature"), ("dock-c", "humidity"), ("dock-c", "pressure")}


async def run_demo(
    backend: Backend,
    engine: Engine,
    out: Callable[[str], None] = print,
    *,
    timeout: float = 20.0,
    linger: float = 0.5,
) -> None:
    """Run the simulated sensors against a running engine, wait for the expected alerts, print them.

    Once every sensor has written all its readings and the expected alerts have come,
    it listens ``linger`` seconds more, to show that the cooldown held back the repeats.
    """
    await engine.wait_ready(timeout)
    alerts: list[Alert] = []
    async with anyio.create_task_group() as tg:
        await tg.start(collect_alerts, backend, alerts)
        async with anyio.create_task_group() as sensors:
            for unit_id, readings in DEMO_READINGS.items():
                out(f"sensor {unit_id}: {len(readings)} readings")
                sensors.start_soon(sensor, backend, unit_id, readings)
        with anyio.fail_after(timeout):
            while not EXPECTED_ALERTS <= {(a.unit_id, a.metric) for a in alerts}:
                await anyio.sleep(0.01)
        await anyio.sleep(linger)
        tg.cancel_scope.cancel()
    out("")
    out("alerts:")
    for a in alerts:
        out(
            f"  {a.at:%H:%M:%S}.{a.at.microsecond // 1000:03d}  {a.metric:<12} {a.message}  (limit {a.limit})"
        )
    out("")
    out(f"latest readings (alert cooldown {COOLDOWN} per unit and metric):")
    for unit_id, readings in DEMO_READINGS.items():
        entry = await backend.kv_get(BUCKET, unit_key(unit_id))
        st = (
            msgspec.json.decode(entry.value, type=UnitReading)
            if entry
            else UnitReading(unit_id=unit_id)
        )
        out_of_range = {
            "temperature": sum(t > st.max_temperature for t, _, _ in readings),
            "humidity": sum(h > st.max_humidity for _, h, _ in readings),
            "pressure": sum(
                abs(p - st.nominal_pressure) > st.pressure_tolerance for _, _, p in readings
            ),
        }
        sent = {
            m: sum(1 for a in alerts if a.unit_id == unit_id and a.metric == m)
            for m in out_of_range
        }
        summary = ", ".join(
            f"{m}: {n} out of range, {sent[m]} alerted"
            for m, n in out_of_range.items()
            if n or sent[m]
        )
        out(
            f"  {unit_id:<10} {st.temperature:5.1f} °C {st.humidity:5.1f} % {st.pressure:6.1f} kPa"
            f"  {summary or 'all readings in range'}"
        )


async def collect_alerts(
    backend: Backend,
    into: list[Alert],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Append every alert published on ``alerts.cold-storage.*`` to ``into`` until cancelled."""
    async with backend.subscribe(f"{ALERTS}.*") as messages:
        task_status.started()
        async for msg in messages:
            into.append(msgspec.json.decode(msg.data, type=Alert))

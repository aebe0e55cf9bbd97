"""How long a change takes from ``kv_put`` until it is pulled from its partition (the
partitioned consumers' own latency, without an engine), on an embedded nats-server.

    python benchmarks/partition_latency.py                 # 1 in flight, then 50
    python benchmarks/partition_latency.py --in-flight 1,10,100 --n 3000

Prints one line per concurrency: the rate and the latency's p50, p90 and p99.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import anyio

from reactive import NatsBackend, NatsServer

PARTITIONS = 8


async def measure(url: str, bucket: str, in_flight: int, n: int) -> str:
    backend = NatsBackend(url)
    await backend.start()
    await backend.ensure_bucket(bucket)
    await backend.ensure_partitioned(bucket, PARTITIONS, group="probe", ack_wait=6, pin_timeout=4)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = anyio.Event()
    async with backend.consume_partitions(bucket, PARTITIONS, group="probe") as changes:

        async def read() -> None:
            async for msg in changes:
                started = sent.pop(msg.entry.key, None)
                if started is not None:
                    latencies.append(time.perf_counter() - started)
                await msg.ack()
                if len(latencies) >= n:
                    done.set()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.sleep(1.0)  # (its pulls are waiting on every partition by then)
            slots = anyio.Semaphore(in_flight)

            async def one(i: int) -> None:
                async with slots:
                    key = f"k.{i}"
                    sent[key] = time.perf_counter()
                    await backend.kv_put(bucket, key, b"x" * 200)
                    while key in sent:
                        await anyio.sleep(0.0005)

            began = time.perf_counter()
            async with anyio.create_task_group() as writers:
                for i in range(n):
                    writers.start_soon(one, i)
            took = time.perf_counter() - began
            await done.wait()
            tg.cancel_scope.cancel()
    await backend.close()
    latencies.sort()

    def ms(q: float) -> str:
        return f"{1000 * latencies[min(len(latencies) - 1, int(len(latencies) * q))]:.2f} ms"

    return (
        f"in flight {in_flight:>4}: {n / took:8.0f}/s  p50 {ms(0.5)}  p90 {ms(0.9)}  p99 {ms(0.99)}"
    )


async def main(args: argparse.Namespace) -> None:
    store = Path(tempfile.mkdtemp(prefix="reactive-partition-latency-"))
    try:
        with NatsServer(data_dir=store) as server:
            for i, in_flight in enumerate(int(c) for c in args.in_flight.split(",")):
                print(await measure(server.url, f"LAT{i}", in_flight, args.n), flush=True)
    finally:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--in-flight", default="1,50", help="comma-separated (default: 1,50)")
    parser.add_argument("--n", type=int, default=3000, help="changes per concurrency")
    anyio.run(main, parser.parse_args())

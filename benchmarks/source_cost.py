"""nats-server's CPU per change through a partitioned bucket, without an engine: one embedded
server, 20,000 ``kv_put`` at 50 in flight into 1,000 keys, 8 partitions, one consumer
acknowledging each change. Prints the server's CPU (user + system, from /proc) per change.

    python benchmarks/source_cost.py

Run it in two checkouts, alternately, to compare what a change to the partitions' server side
costs (session 7: the bucket's ephemeral source against the durable consumer that replaced it).
"""

from __future__ import annotations

import asyncio
import os
import time

from reactive import NatsBackend, NatsServer

CHANGES = 20_000
IN_FLIGHT = 50


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> None:
    server = NatsServer()
    server.start()
    try:
        backend = NatsBackend(server.url)
        await backend.start()
        await backend.ensure_bucket("COST")
        await backend.ensure_partitioned("COST", 8, depths={2})
        taken = 0
        all_taken = asyncio.Event()

        async def consume() -> None:
            nonlocal taken
            async with backend.consume_partitions("COST", 8) as changes:
                async for change in changes:
                    await change.ack()
                    taken += 1
                    if taken >= CHANGES:
                        all_taken.set()

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(1.0)  # (the pins given)
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        room = asyncio.Semaphore(IN_FLIGHT)

        async def put(i: int) -> None:
            async with room:
                await backend.kv_put("COST", f"k.{i % 1000}", b"x" * 200)

        await asyncio.gather(*(put(i) for i in range(CHANGES)))
        await asyncio.wait_for(all_taken.wait(), 60)
        cpu1, t1 = cpu_seconds(server.pid), time.monotonic()
        per_change = 1e6 * (cpu1 - cpu0) / CHANGES
        print(f"server CPU per change {per_change:.1f} µs, {CHANGES / (t1 - t0):.0f} changes/s")
        consumer.cancel()
        await backend.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())

"""What a node's loss does to a bucket's partitions on a 3-node cluster (R3), without an engine:
how long the changes stop reaching the partitioned stream, and whether any change comes twice.

    python benchmarks/source_failover.py --kill kv     # the node leading the bucket's stream
    python benchmarks/source_failover.py --kill part   # the node leading KVPART_...

A writer puts a key every 5 ms and a consumer takes every change from the partitions and
acknowledges it; the node is SIGKILLed after 2 s and restarted after 3 s more. Prints, each
second, how far the bucket and the partitioned stream have come, then the longest time no
change reached the partitions while the bucket moved on, and how many changes were taken more
than once (with the bucket's size first: a partitioned stream sourced again from the start
would bring every key again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import nats
from cluster import NatsCluster

from reactive import NatsBackend
from reactive.backends.partitions import partitioned_stream

BUCKET = "FAILOVER"
PARTITIONS = 8


async def run(kill: str, keys: int, seconds: float) -> None:
    with NatsCluster() as cluster:
        backend = NatsBackend(cluster.urls, replicas=3)
        await backend.start()
        await backend.ensure_bucket(BUCKET)
        await backend.ensure_partitioned(BUCKET, PARTITIONS, group="g", ack_wait=6, pin_timeout=4)
        nc = await nats.connect(servers=cluster.urls)
        js = nc.jetstream()
        part = partitioned_stream(BUCKET, "g")
        seen: dict[tuple[str, int], int] = {}

        async def consume() -> None:
            async with backend.consume_partitions(BUCKET, PARTITIONS, group="g") as changes:
                async for msg in changes:
                    k = (msg.entry.key, msg.entry.revision)
                    seen[k] = seen.get(k, 0) + 1
                    await msg.ack()

        reader = asyncio.create_task(consume())
        for i in range(keys):  # the history, taken in and acknowledged before the kill
            await backend.kv_put(BUCKET, f"k.{i}", b"x")
        while len(seen) < keys:
            await asyncio.sleep(0.2)
        print(f"{keys:,} keys written and taken in")
        stop = False

        async def write() -> None:
            i = 0
            while not stop:
                try:
                    await backend.kv_put(BUCKET, f"k.{i % keys}", b"y")
                except Exception:  # (a write lost with the node: the next one goes on)
                    pass
                i += 1
                await asyncio.sleep(0.005)

        writer = asyncio.create_task(write())
        await asyncio.sleep(2.0)
        stream = f"KV_{BUCKET}" if kill == "kv" else part
        leader = (await js.stream_info(stream)).cluster.leader
        assert leader is not None
        victim = int(leader[1:])
        started = time.monotonic()
        cluster.kill(victim)
        print(f"killed {leader}, the leader of {stream}")
        restarted = False
        last_part, last_moved, longest = -1, started, 0.0
        while time.monotonic() - started < seconds:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if not restarted and now - started > 3.0:
                cluster.restart(victim)
                restarted = True
            try:
                info = json.loads(
                    (await nc.request(f"$JS.API.STREAM.INFO.{part}", b"", timeout=2)).data
                )
                kv = json.loads(
                    (await nc.request(f"$JS.API.STREAM.INFO.KV_{BUCKET}", b"", timeout=2)).data
                )
            except Exception as exc:
                print(f"{now - started:5.1f}s  stream info failed: {exc!r}")
                continue
            got = info["state"]["last_seq"]
            if got != last_part:
                longest = max(longest, now - last_moved)
                last_part, last_moved = got, now
            print(
                f"{now - started:5.1f}s  bucket at {kv['state']['last_seq']:,}  partitions at "
                f"{got:,}  changes taken {sum(seen.values()):,}"
            )
        longest = max(longest, time.monotonic() - last_moved)
        stop = True
        await writer
        reader.cancel()
        twice = sum(n - 1 for n in seen.values() if n > 1)
        print(
            f"longest without a change reaching the partitions: {longest:.1f} s; "
            f"changes taken more than once: {twice:,} (of {len(seen):,})"
        )
        await nc.close()
        await backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kill", choices=("kv", "part"), default="kv")
    parser.add_argument(
        "--keys", type=int, default=5000, help="the bucket's history (default 5000)"
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="how long to watch")
    args = parser.parse_args()
    asyncio.run(run(args.kill, args.keys, args.seconds))

"""Partitioned buckets on a real nats-server: what the shared contract
(tests/partition_contract.py) cannot show, and the server behaviours they rest on.

The server's facts are checked here by the JetStream API itself (raw JSON requests,
as the backend makes them): where the transforms put a key, the pin a pull gets and
the 423 a wrong pin gets, the count of waiting pulls that tells the members apart.
Then what only a server has: a process that dies (its connection closes without a
goodbye) loses its partitions after ``pin_timeout``, a server restart and a deleted
consumer are recovered from.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import nats
import pytest
from pace import stall_excused
from partition_contract import Member, N, keys_per_partition, uid, wait_for

from reactive.backends.nats import NatsBackend
from reactive.backends.partitions import (
    PRIORITY_GROUP,
    consumer_name,
    kv_revision,
    partition_of,
    partitioned_stream,
    presence_consumer,
    source_consumer,
    source_deliver_subject,
    source_transforms,
)
from reactive.backends.server import NatsServer
from reactive.errors import ConnectionLostError

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def api(b: NatsBackend, subject: str, body: object = None) -> dict[str, object]:
    data = b"" if body is None else json.dumps(body).encode()
    reply = await b.nc.request(f"$JS.API.{subject}", data, timeout=5)
    return dict(json.loads(reply.data))


PIN_TIMEOUT = 1.0  # (short: a member that dies loses its partitions after it)


async def partitioned(b: NatsBackend, **options: float) -> str:
    bucket = uid("pb")
    await b.ensure_bucket(bucket)
    await b.ensure_partitioned(bucket, N, **{"pin_timeout": PIN_TIMEOUT, **options})
    return bucket


@asynccontextmanager
async def running(*members: Member) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for member in members:
            tg.start_soon(member.run)
            with anyio.fail_after(10):
                await member.opened.wait()
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


# -- the server's placement and pinning ----------------------------------------------------


async def test_ensure_partitioned_returns_once_the_server_sources_the_bucket(
    nats_url: str,
) -> None:
    # A new stream's source starts a moment after the stream; until it does, a key
    # written twice would come only as its later revision. From the return on, the
    # source runs.
    async with NatsBackend(nats_url) as b:
        bucket = await partitioned(b)
        info = await api(b, f"STREAM.INFO.{partitioned_stream(bucket)}")
        [source] = info["sources"]  # type: ignore[misc]
        assert source["active"] >= 0


async def test_a_replicated_durable_consumer_of_the_bucket_feeds_the_partitions(
    nats_url: str,
) -> None:
    # Durable sourcing (ADR-60): the position lives in a consumer of the bucket's stream,
    # replicated as the bucket is, not in the server's ephemeral source consumer (which
    # lives on the bucket's leader only and is set up again 10-45 s after it dies).
    async with NatsBackend(nats_url) as b:
        bucket = uid("pb")
        await b.ensure_bucket(bucket)
        await b.ensure_partitioned(bucket, N, depths={2, 3}, pin_timeout=PIN_TIMEOUT)
        stream = partitioned_stream(bucket)
        [source] = (await api(b, f"STREAM.INFO.{stream}"))["config"]["sources"]  # type: ignore[index]
        assert source["consumer"] == {
            "name": source_consumer(bucket),
            "deliver_subject": source_deliver_subject(bucket),
        }
        info = await api(b, f"CONSUMER.INFO.KV_{bucket}.{source_consumer(bucket)}")
        config = info["config"]
        assert isinstance(config, dict)
        assert (config["durable_name"], config["ack_policy"], config["deliver_policy"]) == (
            source_consumer(bucket),
            "flow_control",
            "all",
        )
        assert config["filter_subjects"] == [f"$KV.{bucket}.*.*", f"$KV.{bucket}.*.*.*"]
        # Other depths: the consumer's filters follow the stream's transforms; what was
        # taken in is not taken again (the consumer keeps its place).
        await b.kv_put(bucket, "a.b", b"1")
        await wait_for(lambda: stream_messages(b, stream, 1))
        await b.ensure_partitioned(bucket, N, depths={2}, pin_timeout=PIN_TIMEOUT)
        info = await api(b, f"CONSUMER.INFO.KV_{bucket}.{source_consumer(bucket)}")
        assert info["config"]["filter_subjects"] == [f"$KV.{bucket}.*.*"]  # type: ignore[index]
        await b.kv_put(bucket, "a.b.c", b"2")  # (no longer taken in)
        await b.kv_put(bucket, "c.d", b"3")
        await wait_for(lambda: stream_messages(b, stream, 2))
        subjects = [
            (await b.nc.jetstream().get_msg(stream, seq)).subject.split(".", 3)[3] for seq in (1, 2)
        ]
        assert subjects == ["a.b", "c.d"]


async def test_a_partitioned_stream_made_before_durable_sourcing_is_kept(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An earlier version's stream sources the bucket with the server's own consumer: its
    # position cannot be handed to a durable one, so it is kept as it is, with a warning.
    async with NatsBackend(nats_url) as b:
        bucket = uid("pb")
        await b.ensure_bucket(bucket)
        stream = partitioned_stream(bucket)
        transforms = source_transforms(bucket, N, {2})
        await api(
            b,
            f"STREAM.CREATE.{stream}",
            {
                "name": stream,
                "retention": "workqueue",
                "subjects": [],
                "sources": [{"name": f"KV_{bucket}", "subject_transforms": transforms}],
            },
        )
        await b.ensure_partitioned(bucket, N, depths={2}, pin_timeout=PIN_TIMEOUT)
        assert "without a durable consumer" in caplog.text
        [source] = (await api(b, f"STREAM.INFO.{stream}"))["config"]["sources"]  # type: ignore[index]
        assert "consumer" not in source
        missing = await api(b, f"CONSUMER.INFO.KV_{bucket}.{source_consumer(bucket)}")
        assert missing["error"]["err_code"] == 10014  # type: ignore[index]  # (not found)
        await b.kv_put(bucket, "a.b", b"1")
        await wait_for(lambda: stream_messages(b, stream, 1))


async def stream_messages(b: NatsBackend, stream: str, count: int) -> bool:
    state = (await api(b, f"STREAM.INFO.{stream}"))["state"]
    return bool(state["messages"] >= count)  # type: ignore[index]


async def test_the_server_places_every_key_where_partition_of_says(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = await partitioned(b)
        keys = [
            ".".join(f"k{i}t{j}" for j in range(depth)) for i in range(3) for depth in range(1, 21)
        ]
        for key in keys:
            await b.kv_put(bucket, key, b"v")
        stream = partitioned_stream(bucket)

        async def subjects() -> dict[str, int]:
            info = await api(b, f"STREAM.INFO.{stream}", {"subjects_filter": ">"})
            return dict(info["state"].get("subjects") or {})  # type: ignore[union-attr]

        async def all_in() -> bool:
            return len(await subjects()) == len(keys)

        await wait_for(all_in)
        placed = {s.split(".", 3)[3]: int(s.split(".", 1)[0]) for s in await subjects()}
        assert placed == {key: partition_of(key, N) for key in keys}
        # The header naming the source (the bucket's stream and its durable consumer)
        # carries the KV revision as its second token.
        msg = await b.nc.jetstream().get_msg(stream, 1)
        assert msg.headers is not None
        origin, revision, _ = msg.headers["Nats-Stream-Source"].split(" ", 2)
        assert (origin.split(":C=")[0], revision) == (f"KV_{bucket}", "1")
        assert kv_revision(msg.headers["Nats-Stream-Source"]) == 1


async def test_a_pull_gets_the_pin_and_a_wrong_pin_gets_423(nats_url: str) -> None:
    """What the puller rests on, by hand: the first delivery pins the partition to the
    pull that got it (Nats-Pin-Id); a pull with another id is refused with 423."""
    async with NatsBackend(nats_url) as b:
        bucket = await partitioned(b, pin_timeout=60.0)  # (no pin lapses while it checks)
        key = "wf.pinned"
        p = partition_of(key, N)
        await b.kv_put(bucket, key, b"v")
        nc = b.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox + ".*")
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{partitioned_stream(bucket)}.{consumer_name(p)}"
        pull = {"batch": 1, "expires": 5_000_000_000, "group": PRIORITY_GROUP}
        await nc.publish(subject, json.dumps(pull).encode(), reply=f"{inbox}.1")
        msg = await sub.next_msg(timeout=5)
        assert msg.subject == f"{p}.$KV.{bucket}.{key}"
        assert msg.headers is not None
        pin = msg.headers["Nats-Pin-Id"]
        await msg.ack()
        info = await api(b, f"CONSUMER.INFO.{partitioned_stream(bucket)}.{consumer_name(p)}")
        assert (
            info["priority_groups"]
            == [  # the server's state names the pin
                {"group": PRIORITY_GROUP, "pinned_client_id": pin, "pinned_ts": pytest.approx(...)}
            ]
            or info["priority_groups"][0]["pinned_client_id"] == pin
        )  # type: ignore[index]
        await nc.publish(
            subject, json.dumps({**pull, "id": "not-" + pin}).encode(), reply=f"{inbox}.2"
        )
        refused = await sub.next_msg(timeout=5)
        assert refused.headers is not None and refused.headers["Status"] == "423"
        await sub.unsubscribe()


async def test_members_are_counted_by_the_server_and_drop_out_at_once(nats_url: str) -> None:
    async with (
        NatsBackend(nats_url) as b,
        NatsBackend(nats_url) as other,
        NatsBackend(nats_url) as third,
    ):
        # Pulls that last 10 s (a third of the pin timeout): a member counted out sooner
        # went with its inbox, not with its pulls' expiry.
        bucket = await partitioned(b, pin_timeout=30.0)
        one, two, three = Member(b, bucket), Member(other, bucket), Member(third, bucket)
        presence = f"CONSUMER.INFO.{partitioned_stream(bucket)}.{presence_consumer()}"

        async def waiting(n: int) -> bool:
            return (await api(b, presence))["num_waiting"] == n

        async with running(one, two):
            async with running(three):
                await wait_for(lambda: waiting(3))
                await wait_for(lambda: one.consumer is not None and one.consumer.members == 3)
            # The third closed: its pulls went with its inbox, not at their expiry.
            await wait_for(lambda: waiting(2), timeout=5.0)
            await wait_for(lambda: one.consumer is not None and one.consumer.members == 2)


# -- what only a server has --------------------------------------------------------------


async def test_a_member_that_dies_loses_its_partitions_after_pin_timeout(nats_url: str) -> None:
    raw = await nats.connect(nats_url)
    async with NatsBackend(nats_url) as b, NatsBackend(nc=raw) as doomed:
        bucket = await partitioned(b, ack_wait=2.0)
        warm = keys_per_partition(N, "warm")

        async def write_all() -> None:
            for keys in warm.values():
                await b.kv_put(bucket, keys[0], b"w")

        one, two = Member(b, bucket), Member(doomed, bucket, ack=False)
        async with running(one):
            async with anyio.create_task_group() as tg:

                async def run_doomed() -> None:
                    with pytest.raises(ConnectionLostError):
                        await two.run()

                tg.start_soon(run_doomed)
                with anyio.fail_after(10):
                    await two.opened.wait()

                async def split() -> bool:
                    # (Pinned to a partition when its first message arrives, a member hands
                    # it out a moment later: wait for both.)
                    await write_all()
                    return len(one.held) == len(two.held) == N // 2 and bool(two.got)

                await wait_for(split)
                taken = [m.entry for m in two.got]  # taken, never acknowledged
                # It dies: its connection closes with no UNPIN, no goodbye.
                await raw.close()

                async def all_mine() -> bool:
                    await write_all()
                    return one.held == set(range(N))

                await wait_for(all_mine)
            # What it took and never acknowledged comes to the survivor after ack_wait.
            await wait_for(
                lambda: all(any(m.entry.revision == e.revision for m in one.got) for e in taken)
            )


async def test_members_go_on_after_a_server_restart(
    restartable_nats_server: NatsServer,
) -> None:
    server = restartable_nats_server
    async with NatsBackend(server.url) as b:
        bucket = await partitioned(b)
        member = Member(b, bucket)
        async with running(member):
            rev = await b.kv_put(bucket, "wf.before", b"1")
            await wait_for(lambda: any(m.entry.revision == rev for m in member.got))
            await anyio.to_thread.run_sync(server.restart)

            async def arrived() -> bool:
                try:
                    rev = await b.kv_put(bucket, "wf.after", b"2")
                except Exception:
                    return False
                return any(m.entry.key == "wf.after" for m in member.got) or (
                    await _arrives(member, rev)
                )

            await wait_for(arrived, timeout=30)


async def _arrives(member: Member, revision: int) -> bool:
    with anyio.move_on_after(1):
        while not any(m.entry.revision == revision for m in member.got):
            await member.arrival.wait()
        return True
    return False


async def test_a_deleted_partition_consumer_is_made_again(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = await partitioned(b)
        key = "wf.phoenix"
        p = partition_of(key, N)
        member = Member(b, bucket)
        async with running(member):
            rev = await b.kv_put(bucket, key, b"1")
            await wait_for(lambda: any(m.entry.revision == rev for m in member.got))
            await api(b, f"CONSUMER.DELETE.{partitioned_stream(bucket)}.{consumer_name(p)}")
            rev = await b.kv_put(bucket, key, b"2")
            await wait_for(lambda: any(m.entry.revision == rev for m in member.got))


async def test_processes_make_the_set_at_once_without_conflict(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b, NatsBackend(nats_url) as other:
        bucket = uid("pb")
        await b.ensure_bucket(bucket)
        async with anyio.create_task_group() as tg:
            for backend in (b, other, b, other):
                tg.start_soon(lambda be=backend: be.ensure_partitioned(bucket, N))
        info = await api(b, f"STREAM.INFO.{partitioned_stream(bucket)}")
        assert info["state"]["consumer_count"] == N + 1  # type: ignore[index]


async def test_a_member_closing_hands_its_partitions_over_at_once(nats_url: str) -> None:
    """Its context ends (by a cancellation here): it gives its pins up (UNPIN), so the
    other takes them without waiting for a pin_timeout (an hour here)."""
    async with NatsBackend(nats_url) as b, NatsBackend(nats_url) as other:
        bucket = await partitioned(b, pin_timeout=3600.0)
        warm = keys_per_partition(N, "warm")

        async def write_all() -> None:
            for keys in warm.values():
                await b.kv_put(bucket, keys[0], b"w")

        one, two = Member(b, bucket), Member(other, bucket)
        async with running(one, two):

            async def split() -> bool:
                await write_all()
                return len(one.held) == len(two.held) == N // 2

            await wait_for(split)
            two.scope.cancel()

            async def all_mine() -> bool:
                await write_all()
                return one.held == set(range(N))

            await wait_for(all_mine)


async def test_a_later_ensure_replaces_the_timeouts(nats_url: str) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = await partitioned(b, ack_wait=30.0, pin_timeout=5.0)
        await b.ensure_partitioned(bucket, N, ack_wait=7.0, pin_timeout=2.5)
        for p in range(N):
            config = (
                await api(b, f"CONSUMER.INFO.{partitioned_stream(bucket)}.{consumer_name(p)}")
            )["config"]
            assert config["ack_wait"] == 7_000_000_000  # type: ignore[index]
            assert config["priority_timeout"] == 2_500_000_000  # type: ignore[index]


async def test_keep_alive_holds_a_change_past_its_ack_wait_until_the_member_leaves(
    nats_url: str,
) -> None:
    async with NatsBackend(nats_url) as b:
        bucket = await partitioned(b, ack_wait=6.0, pin_timeout=30.0)
        stream = partitioned_stream(bucket)
        await b.kv_put(bucket, "wf.slow", b"v1")
        wpis: list[str] = []
        enough = anyio.Event()

        async def on_ack(msg: nats.aio.msg.Msg) -> None:
            if msg.data == b"+WPI":
                wpis.append(msg.subject)
                if len(wpis) >= 4:  # a third of the ack wait apart: held past it, and more
                    enough.set()

        sub = await b.nc.subscribe(f"$JS.ACK.{stream}.>", cb=on_ack)
        try:
            async with (
                stall_excused(1.5, "a change kept past its ack wait"),
                b.consume_partitions(bucket, N, keep_alive=True) as changes,
            ):
                first = await anext(aiter(changes))
                with anyio.fail_after(60):
                    await enough.wait()
                p = partition_of("wf.slow", N)
                info = await api(b, f"CONSUMER.INFO.{stream}.{consumer_name(p)}")
                assert (info["num_redelivered"], info["num_ack_pending"]) == (0, 1)
                assert first.num_delivered == 1
            # It left without acknowledging: the next member gets it an ack wait later.
            async with b.consume_partitions(bucket, N) as changes:
                with anyio.fail_after(20):
                    again = await anext(aiter(changes))
                assert (again.entry.key, again.num_delivered) == ("wf.slow", 2)
                await again.ack()
        finally:
            await sub.unsubscribe()

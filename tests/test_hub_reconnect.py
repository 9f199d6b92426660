"""What an API process's event hub misses while its connection to Redis is
down (a Redis restart, a killed connection) is made up for when it is back:
streams and waits learn from the store itself what pub/sub did not tell them."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from conftest import RedisServer, Stack
from helpers import StreamReader, new_session
from redis.exceptions import RedisError

from api.hub import DELETED, EventHub, Tick
from api.services import Services
from api.turns import wait_for_end
from shared import keys
from shared.queue import connect
from shared.settings import Settings
from shared.turns import TurnIds, failed, store_unavailable


def _kill_pubsub_connections(url: str, stop: threading.Event) -> None:
    """Kill every pub/sub connection to Redis, again and again until `stop`."""
    client = redis.Redis.from_url(url)
    try:
        while not stop.is_set():
            client.client_kill_filter(_type="pubsub")
            stop.wait(0.02)
    finally:
        client.close()


def test_a_deletion_missed_while_the_hub_reconnects_still_ends_the_stream(
    make_stack: Callable[..., Stack],
) -> None:
    """The session is deleted while the stream's API process has no pub/sub
    connection (the deletion message goes unheard): once the hub is back, the
    stream ends with `session_deleted` (before: it sent keepalives for ever)."""
    stack = make_stack(workers=0, keepalive_seconds="1")
    url = stack.env["SANDSTREAM_REDIS_URL"]
    with stack.client() as client:
        sid = new_session(client)
        stream = StreamReader(client, sid)
        stop = threading.Event()
        killer = threading.Thread(target=_kill_pubsub_connections, args=(url, stop))
        killer.start()
        try:
            time.sleep(0.2)
            assert client.delete(f"/sessions/{sid}").status_code == 204
            time.sleep(0.2)
        finally:
            stop.set()
            killer.join(5)
        deleted_at = time.monotonic()
        events = stream.join(6)
        print(
            f"\nstream ended {time.monotonic() - deleted_at:.2f} s after the hub could hear again"
        )
        assert events and events[-1]["_event"] == "session_deleted", events


def test_a_wait_through_a_hub_reconnect_leaves_nothing_registered(
    redis_url: str, tmp_path: Path
) -> None:
    """A wait on a turn's end that lives through a reconnect of the hub (which
    tells it to listen again, RESYNC) gets the turn's end, and afterwards the hub
    holds no wait of it (before: the wait registered after the reconnect was
    never forgotten, one leaked per wait per reconnect)."""

    async def main() -> None:
        url = redis_url.rsplit("/", 1)[0] + "/9"
        redis_client = await connect(url)
        await redis_client.flushdb()
        hub = EventHub(await connect(url), tick_seconds=60)
        await hub.start()
        svc = Services(
            Settings(sandbox_root=str(tmp_path), keepalive_seconds=60), redis_client, hub, None
        )
        store = svc.store
        sid, turn_id = str(uuid.uuid4()), str(uuid.uuid4())
        running = {"state": "running", "turn_id": turn_id, "sandbox_id": "s", "started": "w"}
        await redis_client.hset(keys.session(sid), mapping=running)
        channel = keys.LIVE_CHANNEL
        try:
            waiting = asyncio.create_task(wait_for_end(svc, sid, turn_id, 0, 8))
            for _ in range(200):  # subscribed to the session's channel
                if (await redis_client.pubsub_numsub(channel))[0][1] == 1:
                    break
                await asyncio.sleep(0.01)
            await redis_client.client_kill_filter(_type="pubsub")
            for _ in range(300):  # and again after the reconnect
                await asyncio.sleep(0.01)
                if hub._ready.is_set() and (await redis_client.pubsub_numsub(channel))[0][1]:
                    break
            ids = TurnIds(session_id=sid, sandbox_id="s", turn_id=turn_id, message_id="m")
            terminal = failed(ids, "error", "test", "ended")
            assert await store.finish_turn(sid, turn_id, "worker", None, terminal, worker_id="w")
            ended = await asyncio.wait_for(waiting, 5)
            assert ended is not None and ended.turn_id == turn_id
            assert hub._replies == {}, "a wait is still registered with the hub"
        finally:
            await hub.stop()
            svc.disk.shutdown()
            await redis_client.aclose()

    asyncio.run(main())


def test_a_subscription_a_stalled_redis_does_not_confirm_is_store_unavailable(
    own_redis: RedisServer,
) -> None:
    """Redis stopped (it holds the connection, answers nothing) when a stream or a
    wait subscribes: the subscription fails as the store being unavailable, which
    the API answers with 503 `store_unavailable` (before: a bare `TimeoutError`
    after 10 s, a 500 `internal_error` for a wait)."""

    async def main() -> None:
        hub = EventHub(await connect(own_redis.url), confirm_seconds=0.5)
        await hub.start()
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        try:
            with pytest.raises(RedisError) as raised:
                async with hub.subscribe(str(uuid.uuid4())):
                    pass
            assert store_unavailable(raised.value)
            print(f"\nunconfirmed subscription failed after {time.monotonic() - began:.2f} s")
            assert time.monotonic() - began < 3
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
            await hub.stop()

    asyncio.run(main())


def test_a_subscription_while_the_hub_has_no_connection_fails_and_leaves_nothing(
    own_redis: RedisServer,
) -> None:
    """Redis is down (restarting, failing over) when a stream or a wait
    subscribes: the subscription fails as the store being unavailable within the
    socket timeout, holds nothing (no client, no channel), and once Redis is back
    the same channel subscribes at once (before: it waited for Redis, however
    long, holding the hub's lock against every other subscription)."""

    async def main() -> None:
        hub = EventHub(await connect(own_redis.url), confirm_seconds=0.5)
        await hub.start()
        sid = str(uuid.uuid4())
        try:
            own_redis.stop()
            for _ in range(200):  # the hub notices
                if not hub._ready.is_set():
                    break
                await asyncio.sleep(0.01)
            began = time.monotonic()
            with pytest.raises(RedisError) as raised:
                async with asyncio.timeout(3), hub.subscribe(sid):
                    pass
            assert store_unavailable(raised.value)
            print(f"\nsubscription without Redis failed after {time.monotonic() - began:.2f} s")
            assert hub.client_count == 0
            own_redis.start()
            for _ in range(300):  # the hub is back
                if hub._ready.is_set():
                    break
                await asyncio.sleep(0.01)
            async with asyncio.timeout(2), hub.subscribe(sid):
                assert hub.client_count == 1
        finally:
            await hub.stop()

    asyncio.run(main())


async def _reconnected(hub: EventHub) -> None:
    for _ in range(300):  # the hub notices the connection is gone
        if not hub._ready.is_set():
            break
        await asyncio.sleep(0.01)
    for _ in range(500):  # and is back
        if hub._ready.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the hub did not reconnect")


def test_a_subscription_lost_unconfirmed_with_the_connection_does_not_break_its_channel(
    own_redis: RedisServer,
) -> None:
    """A subscription is sent but not confirmed (Redis stalls), its client gives
    up, and the hub's connection is then lost (Redis restarts): once the hub is
    back, other sessions on that live channel subscribe as usual (before: each
    later subscription on the channel took the lost one's place in the queue of
    confirmations, waited for one that never came and failed as the store being
    unavailable, for every session sharing the channel, until the process
    restarted)."""

    async def main() -> None:
        hub = EventHub(await connect(own_redis.url), confirm_seconds=0.5)
        await hub.start()
        first = str(uuid.uuid4())
        try:
            assert own_redis.proc is not None
            own_redis.proc.send_signal(signal.SIGSTOP)
            with pytest.raises(RedisError):
                async with hub.subscribe(first):
                    pass
            await asyncio.sleep(0.1)  # its unsubscription goes out
            own_redis.stop()
            own_redis.start()
            await _reconnected(hub)
            for sid in (str(uuid.uuid4()), str(uuid.uuid4()), first):  # one shared channel
                async with asyncio.timeout(3), hub.subscribe(sid):
                    assert hub.client_count == 1
        finally:
            await hub.stop()

    asyncio.run(main())


def test_a_deletion_never_announced_still_ends_the_stream(
    make_stack: Callable[..., Stack],
) -> None:
    """The session's keys go while the hub stays connected, with no message on
    the deleted channel (its deleter's publish was lost): the stream ends with
    `session_deleted` within a keepalive interval or two, not keepalives for ever."""
    stack = make_stack(workers=0, keepalive_seconds="1")
    url = stack.env["SANDSTREAM_REDIS_URL"]
    with stack.client() as client:
        sid = new_session(client)
        stream = StreamReader(client, sid)
        direct = redis.Redis.from_url(url)
        try:
            assert direct.delete(*keys.session_keys(sid))
        finally:
            direct.close()
        events = stream.join(6)
        assert events and events[-1]["_event"] == "session_deleted", events
        assert events[-1]["session_id"] == sid


def test_an_event_logged_but_never_heard_reaches_the_stream_at_a_keepalive(
    make_stack: Callable[..., Stack],
) -> None:
    """An event is in the session's log, but its message never reached the hub
    (and the hub's connection never dropped, so no resync says so): the stream
    sends it within a keepalive interval or two, and the keepalive after it
    reports it as the latest."""
    stack = make_stack(workers=0, keepalive_seconds="1")
    url = stack.env["SANDSTREAM_REDIS_URL"]
    with stack.client() as client:
        sid = new_session(client)
        stream = StreamReader(client, sid)
        direct = redis.Redis.from_url(url)
        try:
            event = {"seq": 1, "type": "session_completed", "session_id": sid, "turn_id": "t"}
            direct.xadd(keys.log(sid), {"t": event["type"], "d": json.dumps(event)}, id="1-0")
            direct.set(keys.seq(sid), 1)
        finally:
            direct.close()
        events = stream.join(6)
        assert [(e["_event"], e["seq"]) for e in events] == [("session_completed", 1)], events
        assert stream.ids == ["1"]


def test_the_hubs_keepalive_tick_goes_on_while_redis_stalls(own_redis: RedisServer) -> None:
    """The hub asks the store about its sessions at each tick. Redis stopped
    (holding the connection, answering nothing): the tick still comes, within
    the confirmation time, saying it does not know the latest seq (the stream
    then reads the log itself and meets the trouble); once Redis answers again
    the ticks carry the latest seq, and a session gone from the store is DELETED."""

    async def main() -> None:
        sid = str(uuid.uuid4())
        store = await connect(own_redis.url)
        await store.hset(keys.session(sid), "id", sid)
        await store.set(keys.seq(sid), 7)
        hub = EventHub(await connect(own_redis.url), tick_seconds=0.2, confirm_seconds=0.5)
        await hub.start()
        assert own_redis.proc is not None
        try:
            async with hub.subscribe(sid) as queue:
                assert await asyncio.wait_for(queue.get(), 2) == Tick(7)
                own_redis.proc.send_signal(signal.SIGSTOP)
                try:
                    assert await asyncio.wait_for(queue.get(), 2) == Tick(None)
                finally:
                    own_redis.proc.send_signal(signal.SIGCONT)
                while (item := await asyncio.wait_for(queue.get(), 5)) == Tick(None):
                    pass
                assert item == Tick(7)
                await store.delete(keys.session(sid))
                while (item := await asyncio.wait_for(queue.get(), 5)) == Tick(7):
                    pass
                assert item == DELETED
        finally:
            await hub.stop()
            await store.aclose()

    asyncio.run(main())

"""The SSE stream: resume without gaps or duplicates, keepalives, lifetime across turns."""

from __future__ import annotations

import time

import httpx
import redis
from helpers import StreamReader, new_session, text_message

from shared import keys


def _run_turns(client: httpx.Client, sid: str, texts: list[str]) -> None:
    for text in texts:
        assert client.post(f"/sessions/{sid}/messages", json=text_message(text)).status_code == 200


def test_last_event_id_yields_exactly_the_events_after_it(
    client: httpx.Client, session_id: str
) -> None:
    _run_turns(client, session_id, ["run: echo one", "hello"])
    everything = StreamReader(client, session_id, until=2, params={"after": "0"}).join()
    seqs = [e["seq"] for e in everything]
    assert seqs == list(range(1, len(seqs) + 1))

    for n in (0, 1, 5, seqs[-2]):
        expected = everything[n:]
        terminals = sum(e["_event"] in {"session_completed", "session_failed"} for e in expected)
        resumed = StreamReader(
            client, session_id, until=terminals, headers={"Last-Event-ID": str(n)}
        ).join()
        assert resumed == expected


def test_resume_then_live_tail_has_no_gap_or_duplicate(
    client: httpx.Client, session_id: str
) -> None:
    _run_turns(client, session_id, ["first"])
    first_turn = StreamReader(client, session_id, params={"after": "0"}).join()
    cut = first_turn[3]["seq"]
    # Reconnect mid-history, stay for the next turn as it happens live.
    reader = StreamReader(client, session_id, until=2, headers={"Last-Event-ID": str(cut)})
    _run_turns(client, session_id, ["run: echo live"])
    events = reader.join()
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(cut + 1, cut + 1 + len(seqs)))
    assert events[-1]["_event"] == "session_completed"
    assert events[-1]["message"]["content"][1]["content"] == "live\n"


def test_stream_survives_across_turns(client: httpx.Client, session_id: str) -> None:
    reader = StreamReader(client, session_id, until=3)
    _run_turns(client, session_id, ["one", "two", "run: true"])
    events = reader.join()
    assert [e["_event"] for e in events].count("session_completed") == 3
    assert len({e["turn_id"] for e in events}) == 3


def test_keepalive_has_no_id_and_reports_latest_seq(client: httpx.Client, session_id: str) -> None:
    _run_turns(client, session_id, ["hi"])
    latest = StreamReader(client, session_id, params={"after": "0"}).join()[-1]["seq"]
    reader = StreamReader(client, session_id, keep_keepalives=True)
    reader.join(10)
    assert len(reader.keepalives) == 2
    for event_id, payload in reader.keepalives:
        # The stream opened with `id: <its cursor>`; a keepalive never moves it.
        assert event_id == str(latest)
        assert payload["type"] == "keepalive" and payload["latest_seq"] == latest
        assert payload["session_id"] == session_id


def test_client_that_leaves_frees_its_subscription(
    client: httpx.Client, session_id: str, redis_client: redis.Redis
) -> None:
    channel = keys.LIVE_CHANNEL
    with client.stream("GET", f"/sessions/{session_id}/stream") as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        assert b": stream open" in next(chunks)
        assert redis_client.pubsub_numsub(channel) == [(channel.encode(), 1)]
    deadline = time.monotonic() + 2
    while redis_client.pubsub_numsub(channel)[0][1] != 0:
        assert time.monotonic() < deadline, "subscription outlived its client"
        time.sleep(0.02)


def test_sessions_sharing_a_live_channel_each_get_only_their_own_events(
    client: httpx.Client, redis_client: redis.Redis
) -> None:
    """The live channel is shared by sessions: a stream gets its own session's
    events only, and the channel stays subscribed while any session has a
    client on this API process."""
    first, second = new_session(client), new_session(client)
    channel = keys.LIVE_CHANNEL
    second_reader = StreamReader(client, second)
    first_reader = StreamReader(client, first)
    assert redis_client.pubsub_numsub(channel) == [(channel.encode(), 1)]
    _run_turns(client, first, ["run: echo first"])
    first_events = first_reader.join()
    assert first_events and {e["session_id"] for e in first_events} == {first}
    time.sleep(0.3)  # the first stream has gone; the second keeps the channel
    assert redis_client.pubsub_numsub(channel) == [(channel.encode(), 1)]
    _run_turns(client, second, ["hello second"])
    second_events = second_reader.join()
    assert {e["session_id"] for e in second_events} == {second}
    assert [e["seq"] for e in second_events] == list(range(1, len(second_events) + 1))
    assert second_events[-1]["_event"] == "session_completed"
    deadline = time.monotonic() + 2
    while redis_client.pubsub_numsub(channel)[0][1] != 0:
        assert time.monotonic() < deadline, "subscription outlived its clients"
        time.sleep(0.02)


def test_many_clients_share_one_subscription(
    client: httpx.Client, session_id: str, redis_client: redis.Redis
) -> None:
    readers = [StreamReader(client, session_id) for _ in range(5)]
    channel = keys.LIVE_CHANNEL
    time.sleep(0.2)
    assert redis_client.pubsub_numsub(channel) == [(channel.encode(), 1)]
    _run_turns(client, session_id, ["hello all"])
    results = [r.join() for r in readers]
    assert all(r == results[0] for r in results)

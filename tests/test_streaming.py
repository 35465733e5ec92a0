"""The parts of live output (``worker/streaming``): coalescing never cuts a character, the
writer's deltas (every interval while there is new text, the last one naming the tool calls),
exact resume from a checkpoint, a failed send that does not stop the call, and the Redis sink
against a real Redis server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from schemas import AssistantDelta
from worker.devtools.redis_server import RedisServer
from worker.queues.memory import MemoryBroker
from worker.streaming.coalesce import MAX_DELTA_CHARS, Coalescer, pieces
from worker.streaming.redis_streams import KEPT_AFTER_RUN, RedisReader, RedisStreams, stream_key
from worker.streaming.sinks import StreamSinks
from worker.streaming.writer import Checkpoint, DeltaSource, DeltaWriter

T = TypeVar("T")
SOURCE = DeltaSource("chat-1", "run_000001_abc", "req-1", step=0, attempt=0)
HIGH, LOW = "\ud83d", "\ude00"  # the two halves of 😀, as a model's JSON escapes send them


def run(coro: Awaitable[T], within: float = 10.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, within)

    return asyncio.run(bounded())


class ListSink:
    """Keeps what it is sent; ``arrived`` is set at each event."""

    kind = "queue"

    def __init__(self, fail: Callable[[dict[str, Any]], bool] = lambda event: False) -> None:
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.arrived = asyncio.Event()
        self._fail = fail

    async def send(self, event: dict[str, Any]) -> None:
        if self._fail(event):
            raise ConnectionError("the queue service went away")
        self.events.append(event)
        self.times.append(time.monotonic())
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        while len(self.events) < count:
            self.arrived.clear()
            await self.arrived.wait()


def texts(events: list[dict[str, Any]]) -> str:
    return "".join(event["text"] for event in events)


# --- coalescing (pure) ----------------------------------------------------------------------


def test_coalescer_joins_a_surrogate_pair_split_over_two_chunks() -> None:
    collected = Coalescer()
    collected.add("smile ")
    collected.add(HIGH)
    assert not collected.ready(), "text ending inside a character is not flushed"
    collected.add(LOW + "!")
    assert collected.ready()
    assert collected.take() == "smile 😀!"
    assert collected.empty


def test_pieces_fit_a_message_and_never_cut_a_pair() -> None:
    text = "x" * (MAX_DELTA_CHARS - 1) + HIGH + LOW + "y"  # a lone pair at the boundary
    cut = pieces(text)
    assert "".join(cut) == text
    assert all(len(piece) <= MAX_DELTA_CHARS for piece in cut)
    assert not cut[0].endswith(HIGH)
    assert pieces("") == [""]


# --- the writer ---------------------------------------------------------------------------


def test_deltas_every_interval_then_the_last_names_the_tool_calls() -> None:
    interval = 0.1

    async def scenario() -> tuple[ListSink, DeltaWriter, float]:
        sink = ListSink()
        writer = DeltaWriter(sink, SOURCE, interval)
        first = time.monotonic()
        await writer.text("Hello ")
        await writer.text("there")
        await sink.wait_for(1)
        await writer.text(", friend")
        await sink.wait_for(2)
        await writer.finish("Hello there, friend.", [("call_1", "lookup")])
        return sink, writer, first

    sink, writer, first = run(scenario())
    assert [e["seq"] for e in sink.events] == [0, 1, 2]
    assert texts(sink.events) == "Hello there, friend."
    assert [e["text"] for e in sink.events] == ["Hello there", ", friend", "."]
    assert sink.times[0] - first >= interval * 0.9, "the first delta comes an interval later"
    assert sink.times[1] - sink.times[0] >= interval * 0.9
    assert sink.events[-1]["toolCalls"] == [{"id": "call_1", "name": "lookup"}]
    assert all(e["toolCalls"] is None for e in sink.events[:-1])
    assert writer.count == 3
    for event in sink.events:
        AssistantDelta.model_validate(event)
        assert event["requestId"] == "req-1" and event["attempt"] == 0 and event["step"] == 0


def test_every_field_of_a_delta_is_present() -> None:
    async def scenario() -> list[dict[str, Any]]:
        sink = ListSink()
        await DeltaWriter(sink, SOURCE, 0.05).finish("", [])
        return sink.events

    [event] = run(scenario())
    assert set(event) == {
        "type", "id", "runId", "requestId", "step", "attempt", "seq", "text", "toolCalls"
    }  # fmt: skip
    assert (event["text"], event["toolCalls"]) == ("", None)


def test_a_character_split_over_chunks_is_never_cut() -> None:
    async def scenario() -> list[dict[str, Any]]:
        sink = ListSink()
        writer = DeltaWriter(sink, SOURCE, 0.05)
        await writer.text("ok " + HIGH)
        await asyncio.sleep(0.15)  # past the interval: the half is held, nothing is sent
        assert sink.events == []
        await writer.text(LOW + " done")
        await sink.wait_for(1)
        await writer.finish(None, [])
        return sink.events

    events = run(scenario())
    assert events[0]["text"] == "ok 😀 done"
    assert texts(events) == "ok 😀 done"
    for event in events:
        event["text"].encode("utf-8")  # every delta is valid Unicode on its own


def test_the_last_delta_takes_the_rest_of_the_stored_text() -> None:
    """What the call stores is the truth: the last delta carries whatever of it was not sent
    (text collected but not flushed, or text a poll brought in one piece)."""

    async def scenario() -> list[dict[str, Any]]:
        sink = ListSink()
        writer = DeltaWriter(sink, SOURCE, 5.0)
        await writer.text("Once upon")
        await writer.finish("Once upon a time " + "x" * MAX_DELTA_CHARS, [])
        return sink.events

    events = run(scenario())
    assert texts(events) == "Once upon a time " + "x" * MAX_DELTA_CHARS
    assert [e["seq"] for e in events] == [0, 1]


def test_a_failed_send_is_counted_and_the_call_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[ListSink, DeltaWriter]:
        sink = ListSink(fail=lambda event: event["seq"] == 0)
        writer = DeltaWriter(sink, SOURCE, 0.05)
        await writer.text("lost ")
        await asyncio.sleep(0.12)
        await writer.finish("lost found", [])
        return sink, writer

    sink, writer = run(scenario())
    assert [e["seq"] for e in sink.events] == [1]
    assert sink.events[0]["text"] == "found"
    assert (writer.sent, writer.failed, writer.count) == (1, 1, 2)


def test_a_resumed_call_sends_its_last_checkpointed_delta_again_then_goes_on() -> None:
    """Exact resume: the checkpoint of a delta is stored before the delta is sent; the try
    that takes the call over sends that delta again (same seq, same text) and goes on after
    its position in the remote stream, under the same attempt."""

    async def first_try() -> tuple[list[Checkpoint], ListSink]:
        stored: list[Checkpoint] = []
        sink = ListSink()

        async def checkpoint(point: Checkpoint) -> None:
            stored.append(point)

        async def started(handle: dict[str, Any], point: Checkpoint) -> None:
            stored.append(point)

        writer = DeltaWriter(sink, SOURCE, 0.05, checkpoint=checkpoint, on_started=started)
        await writer.started({"responseId": "resp_1"}, 0)
        await writer.text("one ", 4)
        await sink.wait_for(1)
        await writer.text("two ", 5)
        await writer.text("three ", 6)
        await sink.wait_for(2)
        await writer.settle()  # the worker dies here
        return stored, sink

    stored, sink = run(first_try())
    assert [e["text"] for e in sink.events] == ["one ", "two three "]
    last = stored[-1]
    assert (last.seq, last.chars, last.until, last.text) == (1, 4, 6, "two three ")
    assert stored[0] == Checkpoint(0, 0, 0, 0, None)

    async def takeover() -> tuple[ListSink, DeltaWriter]:
        sink = ListSink()
        writer = DeltaWriter(sink, SOURCE, 0.05, resume=last)
        assert writer.resume_after == 6
        await writer.begin()
        await writer.text("four", 7)
        await writer.finish("one two three four", [])
        return sink, writer

    again, writer = run(takeover())
    assert [(e["seq"], e["text"]) for e in again.events] == [(1, "two three "), (2, "four")]
    assert writer.count == 3
    assert writer.progress().seq == 3

    # The consumer rule puts them together: keep the highest attempt, order by seq, drop repeats.
    kept = {e["seq"]: e["text"] for e in [*sink.events, *again.events]}
    assert "".join(kept[seq] for seq in sorted(kept)) == "one two three four"


def test_a_checkpoint_that_cannot_be_stored_fails_the_call() -> None:
    async def scenario() -> None:
        async def refuse(point: Checkpoint) -> None:
            raise RuntimeError("the claim was taken over")

        sink = ListSink()
        writer = DeltaWriter(sink, SOURCE, 0.02, checkpoint=refuse)
        await writer.started({}, 0)
        await writer.text("never sent", 1)
        with pytest.raises(RuntimeError, match="taken over"):
            for position in range(2, 200):
                await asyncio.sleep(0.01)
                await writer.text(" more", position)
        assert sink.events == []

    run(scenario())


# --- sinks --------------------------------------------------------------------------------


def test_the_queue_sink_sends_deltas_to_reply_to_and_redis_replaces_it() -> None:
    async def scenario() -> list[str]:
        broker = MemoryBroker()
        sinks = StreamSinks(broker, "none")
        sink = sinks.for_request("chat-1", "req-1", "replies")
        assert sink is not None and sink.kind == "queue"
        await sink.send({"type": "assistantDelta", "seq": 0})
        assert sinks.for_request("chat-1", "req-1", None) is None
        assert not sinks.can_stream(None) and sinks.can_stream("replies")
        return broker.queue("replies").bodies()

    assert [json.loads(body)["seq"] for body in run(scenario())] == [0]


def test_the_redis_sink_appends_to_the_request_stream(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        streams = RedisStreams(redis_server.url)
        reader = RedisReader(redis_server.url)
        sinks = StreamSinks(MemoryBroker(), "none", redis=streams, run_timeout=600)
        try:
            sink = sinks.for_request("chat-r", "req-r", "replies-ignored")
            assert sink is not None and sink.kind == "redis"
            writer = DeltaWriter(sink, DeltaSource("chat-r", "run_1", "req-r", 0, 0), 0.02)
            await writer.text("streamed to redis")
            await writer.finish("streamed to redis", [])
            key = stream_key("chat-r", "req-r")
            assert key == "assistant-stream:chat-r:req-r"
            assert await reader.ttl(key) > KEPT_AFTER_RUN, "kept while the run may go on"
            await sinks.publish_reply("chat-r", "req-r", {"type": "assistantReply"})
            entries = await reader.read(key)
            assert [event["type"] for _, event in entries][-1] == "assistantReply"
            assert texts([e for _, e in entries if e["type"] == "assistantDelta"]) == (
                "streamed to redis"
            )
            assert 0 < await reader.ttl(key) <= KEPT_AFTER_RUN, "an hour after the run ended"
            # A client that lost its connection goes on from the last entry it saw.
            first_id = entries[0][0]
            rest = await reader.read(key, first_id, block=0.1)
            assert [entry_id for entry_id, _ in rest] == [e for e, _ in entries[1:]]
            assert await reader.read(key, entries[-1][0], block=0.05) == []
        finally:
            await sinks.close()
            await reader.close()

    run(scenario())


def test_hundreds_of_streams_at_once_share_the_redis_connections(
    redis_server: RedisServer,
) -> None:
    """200 runs streaming at once on one worker each send a delta at the same instant: every
    send waits for one of the process's connections instead of failing (the client's default
    pool refused the 101st with "Too many connections", and those deltas were lost)."""

    async def scenario() -> list[int]:
        streams = RedisStreams(redis_server.url)
        reader = RedisReader(redis_server.url)
        sinks = StreamSinks(MemoryBroker(), "none", redis=streams)
        try:
            sends = []
            for n in range(200):
                sink = sinks.for_request("crowd", f"req-{n}", None)
                assert sink is not None
                sends.append(sink.send({"type": "assistantDelta", "seq": 0, "text": "x" * 2000}))
            await asyncio.gather(*sends)
            return [len(await reader.read(stream_key("crowd", f"req-{n}"), block=0.01))
                    for n in range(200)]  # fmt: skip
        finally:
            await sinks.close()
            await reader.close()

    assert run(scenario(), within=60) == [1] * 200

"""The fake OpenAI server streams both APIs, driven by the real `openai` client over real HTTP:
chat chunks (text word by word, tool calls in pieces, the usage last), Responses typed events
with their `sequence_number`, a background stream resumed with `starting_after`, the per-chunk
delay, and faults in the middle of a stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import openai
import pytest

from worker.testing import FakeOpenAI
from worker.testing.fake_openai_stream import text_pieces

T = TypeVar("T")
TIMEOUT = 10.0


def run(scenario: Callable[[FakeOpenAI, openai.AsyncOpenAI], Awaitable[T]], **options: Any) -> T:
    """Run ``scenario`` against a fresh fake with an async client, bounded in time."""

    async def main() -> T:
        async with (
            FakeOpenAI(**options) as fake,
            openai.AsyncOpenAI(
                base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=5
            ) as client,
        ):
            return await asyncio.wait_for(scenario(fake, client), TIMEOUT)

    return asyncio.run(main())


def test_text_is_cut_by_words_and_inside_surrogate_pairs() -> None:
    pieces = text_pieces("Hi 😀 there")
    assert pieces[0] == "Hi "
    # The emoji's two UTF-16 halves travel in two pieces; joined they are the character.
    assert "".join(pieces).encode("utf-16-le", "surrogatepass").decode("utf-16-le") == (
        "Hi 😀 there"
    )
    assert any(len(p) == 1 and 0xD800 <= ord(p) <= 0xDBFF for p in pieces)


def test_chat_stream_sends_text_tool_calls_and_usage() -> None:
    async def scenario(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
        fake.script(
            "m",
            [
                {
                    "content": "Let me look.",
                    "tool_calls": [
                        {"name": "lookup", "arguments": {"city": "Seattle, WA", "days": 3}},
                        {"name": "nickname", "arguments": {"city": "Seattle, WA"}},
                    ],
                }
            ],
        )
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish = None
        usage = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
                for call in choice.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                    entry["id"] += call.id or ""
                    if call.function is not None:
                        entry["name"] += call.function.name or ""
                        entry["arguments"] += call.function.arguments or ""
        assert "".join(text) == "Let me look."
        assert finish == "tool_calls"
        assert [c["name"] for c in calls.values()] == ["lookup", "nickname"]
        assert json.loads(calls[0]["arguments"]) == {"city": "Seattle, WA", "days": 3}
        assert usage is not None and usage.total_tokens > 0

    run(scenario)


def test_chat_stream_waits_the_chunk_delay_and_records_the_first_token() -> None:
    async def scenario(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> float:
        fake.script("m", [{"content": "one two three four five"}])
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for _ in stream:
            pass
        [record] = [r for r in fake.requests if r.endpoint == "chat.create"]
        assert record.first_token_at is not None and record.first_token_at >= record.at
        return time.monotonic() - started

    assert run(scenario, chunk_delay=0.05) >= 5 * 0.05


def test_chat_stream_fault_after_half_the_text() -> None:
    async def scenario(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
        fake.script("m", [{"content": "a b c d e f"}, {"content": "a b c d e f"}])
        fake.fault("429", count=1, after_fraction=0.5)
        fake.fault("drop", count=1, after_chunks=2)
        got: list[str] = []
        with pytest.raises(openai.APIError) as limited:
            async for chunk in await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                got.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(got) == "a b c "
        assert isinstance(limited.value.body, dict)
        assert limited.value.body["code"] == "rate_limit_exceeded"
        got.clear()
        with pytest.raises(openai.APIConnectionError):
            async for chunk in await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                got.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(got) == "a b "

    run(scenario)


def test_a_mid_stream_rule_leaves_calls_without_streaming_alone() -> None:
    async def scenario(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
        rule = fake.fault("drop", after_chunks=0)
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "You said: hi"
        assert rule.seen == 0

    run(scenario)


def test_responses_background_stream_and_its_resume() -> None:
    async def scenario(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
        fake.script("m", [{"content": "alpha beta gamma delta"}])
        stream = await client.responses.create(
            model="m", input="hi", background=True, store=True, stream=True
        )
        events: list[Any] = []
        async for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) > 5:
                break  # the client loses the stream after two words
        await stream.close()
        numbers = [e.sequence_number for e in events]
        assert numbers == list(range(len(numbers)))
        assert events[0].type == "response.created"
        response_id = events[0].response.id
        last = events[-1].sequence_number
        retrieved = await client.responses.retrieve(response_id)
        assert retrieved.status == "in_progress"
        resumed = await client.responses.retrieve(response_id, stream=True, starting_after=last)
        rest: list[Any] = [event async for event in resumed]
        assert rest[0].sequence_number == last + 1
        deltas = [e.delta for e in [*events, *rest] if e.type == "response.output_text.delta"]
        assert "".join(deltas) == "alpha beta gamma delta"
        assert rest[-1].type == "response.completed"
        assert rest[-1].response.output_text == "alpha beta gamma delta"
        assert (await client.responses.retrieve(response_id)).status == "completed"

    run(scenario, chunk_delay=0.1)


def test_responses_stream_of_function_calls_and_a_dropped_stream() -> None:
    async def scenario(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
        fake.script("m", [{"tool_calls": [{"name": "f", "arguments": {"x": "a long value"}}]}])
        fake.fault("drop", count=1, api="responses", after_chunks=1)
        events: list[Any] = []
        with pytest.raises(openai.APIConnectionError):
            async for event in await client.responses.create(
                model="m", input="hi", background=True, store=True, stream=True
            ):
                events.append(event)
        response_id = events[0].response.id
        resumed = await client.responses.retrieve(
            response_id, stream=True, starting_after=events[-1].sequence_number
        )
        rest: list[Any] = [event async for event in resumed]
        pieces = [
            e.delta for e in [*events, *rest] if e.type == "response.function_call_arguments.delta"
        ]
        assert json.loads("".join(pieces)) == {"x": "a long value"}
        [call] = [item for item in rest[-1].response.output if item.type == "function_call"]
        assert call.name == "f"

    run(scenario, chunk_delay=0.01)

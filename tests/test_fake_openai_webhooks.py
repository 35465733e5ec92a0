"""The fake OpenAI server's webhooks, metadata and reasoning items, over real HTTP.

A small aiohttp receiver stands for the worker's webhook route: it checks each delivery's
signature with the `standardwebhooks` library (as the worker does) and records it. The fake runs
on the same event loop (`async with FakeOpenAI()`); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.testing import FakeOpenAI

T = TypeVar("T")

SECRET = "whsec_" + base64.b64encode(b"the fake's signing key, for tests").decode()
DELAY = 0.1
WITHIN = 10.0


@dataclass
class Receiver:
    """What the webhook endpoint received: verified events, refused attempts."""

    url: str = ""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (webhook-id, body)
    forged: int = 0
    fail_next: int = 0  # answer this many attempts 500 before accepting

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = Webhook(SECRET).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.forged += 1
            return web.Response(status=400)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500)
        self.events.append((request.headers["webhook-id"], event))
        return web.Response(status=200)


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield found
    finally:
        await runner.cleanup()


async def eventually(check: Callable[[], T | None], what: str) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def scenario(body: Callable[[FakeOpenAI, Receiver, openai.AsyncOpenAI], Awaitable[None]]) -> None:
    async def main() -> None:
        async with receiver() as hooks, FakeOpenAI(background_delay=DELAY) as fake:
            client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
            try:
                await asyncio.wait_for(body(fake, hooks, client), WITHIN * 2)
            finally:
                await client.close()

    asyncio.run(main())


async def background(client: openai.AsyncOpenAI, text: str, **extra: Any) -> str:
    response = await client.responses.create(
        model="gpt-4o", input=text, background=True, store=True, **extra
    )
    return str(response.id)


def test_a_background_response_that_ends_sends_one_signed_event() -> None:
    """Completed and cancelled responses are announced once each, signed, naming the response;
    a non-background response and a fake without webhooks announce nothing."""

    async def body(fake: FakeOpenAI, hooks: Receiver, client: openai.AsyncOpenAI) -> None:
        await background(client, "before webhooks")  # configured after: never announced
        fake.configure_webhooks(hooks.url, SECRET)
        done = await background(client, "hello", metadata={"chatId": "c1", "runId": "r1"})
        fake.background_delay = 30.0
        stopped = await background(client, "stop me")
        await client.responses.cancel(stopped)
        await client.responses.create(model="gpt-4o", input="sync")  # not background
        fake.background_delay = DELAY
        await eventually(lambda: len(hooks.events) >= 2, "two events")
        await asyncio.sleep(3 * DELAY)  # nothing more comes
        by_response = {event["data"]["id"]: event for _, event in hooks.events}
        assert set(by_response) == {done, stopped}
        assert by_response[done]["type"] == "response.completed"
        assert by_response[stopped]["type"] == "response.cancelled"
        assert all(event["object"] == "event" for event in by_response.values())
        assert hooks.forged == 0
        # The response keeps its metadata (the worker finds its run from it).
        retrieved = await client.responses.retrieve(done)
        assert retrieved.metadata == {"chatId": "c1", "runId": "r1"}

    scenario(body)


def test_failed_deliveries_are_retried_with_the_same_id() -> None:
    async def body(fake: FakeOpenAI, hooks: Receiver, client: openai.AsyncOpenAI) -> None:
        fake.configure_webhooks(hooks.url, SECRET, retry_delays=(0.05, 0.05, 0.05))
        hooks.fail_next = 2
        response_id = await background(client, "retried")
        await eventually(lambda: hooks.events, "the event after two refusals")
        [delivery] = fake.webhook_deliveries
        assert delivery.attempts == [500, 500, 200]
        assert hooks.events[0][0] == delivery.webhook_id
        assert hooks.events[0][1]["data"]["id"] == response_id

    scenario(body)


def ended(fake: FakeOpenAI, count: int) -> list[Any] | None:
    """The fake's webhook events once ``count`` responses have ended."""
    deliveries = fake.webhook_deliveries
    return deliveries if len(deliveries) >= count else None


def test_drops_and_duplicates_are_seeded() -> None:
    """With a seed, the same events are dropped and duplicated every time; a duplicate is the
    same event (same webhook-id) delivered twice."""

    async def body(fake: FakeOpenAI, hooks: Receiver, client: openai.AsyncOpenAI) -> None:
        fake.configure_webhooks(hooks.url, SECRET, drop_rate=0.3, duplicate_rate=0.3, seed=7)
        for n in range(20):
            await background(client, f"r{n}")
        deliveries = await eventually(lambda: ended(fake, 20), "20 events")
        sent = [d for d in deliveries if not d.dropped]
        expected = sum(2 if d.duplicated else 1 for d in sent)
        await eventually(lambda: len(hooks.events) >= expected, f"{expected} deliveries")
        dropped = [d for d in deliveries if d.dropped]
        doubled = [d for d in sent if d.duplicated]
        assert dropped and doubled, "the seed draws both faults among 20 events"
        ids = [webhook_id for webhook_id, _ in hooks.events]
        assert all(ids.count(d.webhook_id) == 2 for d in doubled)
        assert not {d.webhook_id for d in dropped} & set(ids)
        pattern = [(d.dropped, d.duplicated) for d in deliveries]

        # The same seed draws the same faults for the same order of events.
        fake.reset()
        hooks.events.clear()
        fake.configure_webhooks(hooks.url, SECRET, drop_rate=0.3, duplicate_rate=0.3, seed=7)
        for n in range(20):
            await background(client, f"again {n}")
        again = await eventually(lambda: ended(fake, 20), "20 events again")
        assert [(d.dropped, d.duplicated) for d in again] == pattern

    scenario(body)


def test_reasoning_items_and_their_encrypted_content() -> None:
    """A reasoning model's output starts with a reasoning item; its encrypted content comes with
    `include`, is accepted back as input, and content the fake did not produce is refused. A
    service without `include` refuses it."""

    async def body(fake: FakeOpenAI, hooks: Receiver, client: openai.AsyncOpenAI) -> None:
        first = await client.responses.create(
            model="o-reasoner", input="hi", include=["reasoning.encrypted_content"]
        )
        [reasoning, message] = first.output
        assert reasoning.type == "reasoning" and message.type == "message"
        assert reasoning.encrypted_content
        plain = await client.responses.create(model="o-reasoner", input="hi")
        assert plain.output[0].type == "reasoning" and not plain.output[0].encrypted_content
        echo = await client.responses.create(model="gpt-4o", input="hi")
        assert [item.type for item in echo.output] == ["message"]

        given: Any = {
            "type": "reasoning",
            "id": reasoning.id,
            "summary": [],
            "encrypted_content": reasoning.encrypted_content,
        }
        await client.responses.create(
            model="o-reasoner", input=[given, {"role": "user", "content": "and?"}]
        )
        forged: Any = {**given, "encrypted_content": base64.b64encode(b"made up").decode()}
        with pytest.raises(openai.BadRequestError, match="could not be verified"):
            await client.responses.create(
                model="o-reasoner", input=[forged, {"role": "user", "content": "and?"}]
            )
        fake.include_supported = False
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(
                model="o-reasoner", input="hi", include=["reasoning.encrypted_content"]
            )
        assert json.loads(refused.value.response.text)["error"]["param"] == "include"

    scenario(body)

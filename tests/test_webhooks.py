"""``POST /webhooks/openai`` on a real worker (in-process, on Azurite), over real HTTP, with the
fake model sending signed webhooks when its background responses end.

- a signed webhook continues its run at once: the reply comes long before the next
  safety-net poll, with one retrieve of the response;
- a dropped webhook delays its run until the safety-net poll, no more;
- a duplicated one changes nothing (not even a second poll);
- a forged, stale, oversized or replayed delivery, and events for unknown, foreign or finished
  runs, change nothing;
- a response that ends before its create's step has stored it is not left to the safety net;
- with webhooks off (the default) the route does not exist; with WORKER_WEBHOOK_PORT it is
  served alone on its own port.

Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from azure.core.exceptions import ResourceNotFoundError
from standardwebhooks.webhooks import Webhook

from handlers.webhooks import wake
from tests.support.env import StorageEnv, run
from tests.support.runs import (
    ReplyQueue,
    chat_rows,
    create_body,
    eventually,
    model_env,
    post_body,
    serving,
)
from tests.support.scrape import REQUEST_TIMEOUT, Samples, http_settings, scrape, total
from worker.app import App
from worker.config.settings import Settings
from worker.http.webhooks import SeenIds
from worker.runs.model import Run
from worker.testing import FakeOpenAI

SECRET = "whsec_" + base64.b64encode(b"the test's webhook signing key").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the key being rotated out").decode()
WRONG_SECRET = "whsec_" + base64.b64encode(b"a key the worker never had").decode()
MODEL = "gpt-4o"  # the fake's echo scenario: "You said: ..."
PATH = "/webhooks/openai"


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    seconds: float


def signed(
    event: dict[str, Any],
    secret: str = SECRET,
    *,
    webhook_id: str | None = None,
    at: datetime | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A delivery as the provider signs it (with the Standard Webhooks library)."""
    body = json.dumps(event).encode()
    webhook_id = webhook_id or f"wh_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, at, body),
    }
    return body, headers


def ended(response_id: str, kind: str = "response.completed") -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "created_at": int(time.time()),
        "type": kind,
        "data": {"id": response_id},
    }


async def deliver(url: str, body: bytes, headers: dict[str, str]) -> Answer:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        text = await response.text()
        payload = json.loads(text) if response.content_type == "application/json" else text
        return Answer(response.status, payload, time.monotonic() - started)


def hook_url(app: App) -> str:
    server = app.webhook_http or app.http
    assert server is not None and server.port
    return f"http://127.0.0.1:{server.port}{PATH}"


def settings_for(storage: StorageEnv, fake: FakeOpenAI, **extra: str) -> Settings:
    return http_settings(
        storage,
        **model_env(
            fake.base_url,
            CHAT_MODEL_DEPLOYMENT_NAME=MODEL,
            WORKER_MODEL_API="responses",
            WORKER_WEBHOOK_SECRETS=f"{SECRET},{OLD_SECRET}",
            **extra,
        ),
    )


async def run_row(storage: StorageEnv, chat_id: str) -> dict[str, Any]:
    rows = await chat_rows(storage, chat_id, storage.table)
    assert len(rows.runs) == 1, rows.runs
    return rows.runs[0]


async def polling(storage: StorageEnv, chat_id: str) -> dict[str, Any] | None:
    """The chat's run once it waits between two polls of its response."""
    try:
        rows = await chat_rows(storage, chat_id, storage.table)
    except ResourceNotFoundError:
        return None  # the create has not made the table yet
    if rows.runs and rows.runs[0].get("Phase") == "poll":
        return rows.runs[0]
    return None


Scenario = Callable[[StorageEnv, FakeOpenAI, App, ReplyQueue], Awaitable[None]]


def scenario(storage: StorageEnv, body: Scenario, *, delay: float, **extra: str) -> None:
    """A worker with webhooks on, the fake sending them to it, a chat on ``responses``."""

    async def main() -> None:
        async with (
            FakeOpenAI(background_delay=delay) as fake,
            serving(settings_for(storage, fake, **extra)) as app,
        ):
            replies = ReplyQueue(storage, f"replies-{storage.suffix}")
            await storage.send(create_body(f"hook-{storage.suffix}", storage.table))
            await asyncio.wait_for(body(storage, fake, app, replies), 60)

    run(main())


async def post(storage: StorageEnv, replies: ReplyQueue, text: str) -> float:
    chat_id = f"hook-{storage.suffix}"
    await storage.send(post_body(chat_id, storage.table, text, replyTo=replies.name))
    return time.monotonic()


def test_a_signed_webhook_continues_its_run_at_once(storage: StorageEnv) -> None:
    """The response takes 1 s; the safety-net poll is 30 s away; the reply comes about when
    the response ends, after one create and one retrieve."""

    async def body(storage: StorageEnv, fake: FakeOpenAI, app: App, replies: ReplyQueue) -> None:
        fake.configure_webhooks(hook_url(app), SECRET)
        sent = await post(storage, replies, "hello")
        [reply] = await replies.wait_for("assistantReply", 20)
        waited = time.monotonic() - sent
        assert reply["status"] == "completed" and reply["content"] == "You said: hello"
        assert waited < 8, f"the reply took {waited:.1f} s: the webhook did not continue the run"
        assert fake.calls(endpoint="responses.create") == 1
        assert fake.calls(endpoint="responses.retrieve") == 1
        [delivery] = fake.webhook_deliveries
        assert delivery.attempts == [202]  # accepted: the run is continued after the answer
        assert max(delivery.answered_in) < 1.0
        samples = await scrape(app)
        assert total(samples, "assistant_worker_webhooks_total", outcome="continued") == 1

    scenario(storage, body, delay=1.0, WORKER_WEBHOOK_POLL_BACKOFF="30")


def test_a_dropped_webhook_delays_the_run_until_the_safety_net_poll(storage: StorageEnv) -> None:
    async def body(storage: StorageEnv, fake: FakeOpenAI, app: App, replies: ReplyQueue) -> None:
        fake.configure_webhooks(hook_url(app), SECRET, drop_rate=1.0, seed=1)
        sent = await post(storage, replies, "lost")
        [reply] = await replies.wait_for("assistantReply", 30)
        waited = time.monotonic() - sent
        assert reply["status"] == "completed"
        assert [d.dropped for d in fake.webhook_deliveries] == [True]
        # Not at the response's end (0.3 s), but at the safety-net poll (3 s): delayed, not lost.
        assert 2.5 <= waited < 15, waited
        assert fake.calls(endpoint="responses.retrieve") == 1

    scenario(storage, body, delay=0.3, WORKER_WEBHOOK_POLL_BACKOFF="3")


def test_a_duplicated_webhook_changes_nothing(storage: StorageEnv) -> None:
    async def body(storage: StorageEnv, fake: FakeOpenAI, app: App, replies: ReplyQueue) -> None:
        fake.configure_webhooks(hook_url(app), SECRET, duplicate_rate=1.0, seed=1)
        await post(storage, replies, "twice")
        await replies.wait_for("assistantReply", 20)
        [delivery] = fake.webhook_deliveries
        await eventually(
            lambda: asyncio.sleep(0, len(delivery.attempts) == 2), 10, "the second delivery"
        )
        assert delivery.attempts == [202, 200]  # accepted, then a duplicate
        await asyncio.sleep(1.0)  # room for anything the duplicate could have started
        assert fake.calls(endpoint="responses.retrieve") == 1  # one poll, not two
        assert len(await replies.drain()) == 1
        samples = await scrape(app)
        assert total(samples, "assistant_worker_webhooks_total", outcome="duplicate") == 1

    scenario(storage, body, delay=0.5, WORKER_WEBHOOK_POLL_BACKOFF="30")


def test_forged_stale_replayed_and_foreign_webhooks_change_nothing(storage: StorageEnv) -> None:
    """While a run waits for its response (which the fake does not announce), deliveries that
    must not count are refused or ignored: the run row does not change, no poll happens and no
    step is queued. Then the genuine event continues the run; replayed to this worker or to
    another replica, it does nothing more."""

    async def body(storage: StorageEnv, fake: FakeOpenAI, app: App, replies: ReplyQueue) -> None:
        chat_id = f"hook-{storage.suffix}"
        await post(storage, replies, "guarded")
        before = await eventually(lambda: polling(storage, chat_id), 20, "the run to poll")
        response_id = json.loads(before["Handle"])["responseId"]
        url = hook_url(app)
        good = ended(response_id)

        forged = await deliver(url, *signed(good, WRONG_SECRET))
        stale = await deliver(url, *signed(good, at=datetime.now(UTC) - timedelta(minutes=6)))
        future = await deliver(url, *signed(good, at=datetime.now(UTC) + timedelta(minutes=6)))
        body_, headers = signed(good)
        tampered = await deliver(url, body_.replace(b"completed", b"cancelled"), headers)
        unsigned = await deliver(url, body_, {"content-type": "application/json"})
        huge = await deliver(url, *signed({**good, "padding": "x" * 70_000}))
        assert [a.status for a in (forged, stale, future, tampered, unsigned)] == [400] * 5
        assert huge.status == 413
        assert all(a.seconds < 1.0 for a in (forged, stale, future, tampered, unsigned, huge))

        foreign = await (await fake_client(fake)).responses.create(
            model=MODEL, input="x", background=True, store=True, metadata={"app": "other"}
        )
        outcomes = [
            await settle(app, url, signed(ended("resp_nobodyknows"))),
            await settle(app, url, signed({**ended(response_id), "type": "batch.completed"})),
            await settle(app, url, signed(ended(foreign.id))),
        ]
        assert outcomes == ["unknown", "ignored", "unknown"]
        await asyncio.sleep(1.0)  # room for a step that should not have been sent
        assert await run_row(storage, chat_id) == before, "the run changed"
        assert polls_of(fake, response_id) == 0
        assert await storage.count(storage.runs_queue) == 1  # the scheduled (delayed) poll

        # The genuine event, once the response has ended: the run completes at once. Two
        # copies with ids of their own (as two deliveries the worker cannot tell apart) both
        # send the run's polling step: the second copy of the step is stale and does nothing.
        fake.background_delay = 0.0
        delivery = signed(good, OLD_SECRET)  # a secret being rotated out still verifies
        before_genuine = await scrape(app)
        genuine, twin = await asyncio.gather(deliver(url, *delivery), deliver(url, *signed(good)))
        assert {genuine.status, twin.status} <= {200, 202}
        [reply] = await replies.wait_for("assistantReply", 10)
        assert webhook_outcomes(await scrape(app), before_genuine)["continued"] >= 1
        assert reply["status"] == "completed"
        done = await run_row(storage, chat_id)
        rows = await chat_rows(storage, chat_id, storage.table)
        assert rows.roles == ["System", "User", "Assistant"]
        # Replayed to this worker: a duplicate; to another replica: a finished run.
        assert await settle(app, url, delivery) == "duplicate"
        async with serving(settings_for(storage, fake)) as replica:
            assert await settle(replica, hook_url(replica), delivery) == "finished"
        await asyncio.sleep(0.5)
        assert await run_row(storage, chat_id) == done
        assert len(await replies.drain()) == 1

    scenario(storage, body, delay=600.0, WORKER_WEBHOOK_POLL_BACKOFF="60")


def webhook_outcomes(after: Samples, before: Samples) -> Counter[str]:
    """What the deliveries between two scrapes came to (assistant_worker_webhooks_total)."""
    grown: Counter[str] = Counter()
    for (name, labels), value in after.items():
        if name == "assistant_worker_webhooks_total":
            grown[dict(labels)["outcome"]] += int(value - before.get((name, labels), 0.0))
    return +grown


async def settle(app: App, url: str, delivery: tuple[bytes, dict[str, str]]) -> str:
    """Deliver, and what the delivery came to: its answer's outcome, or, when it was answered
    202 (its work goes on after the answer), the outcome its work counted."""
    before = await scrape(app)
    answer = await deliver(url, *delivery)
    assert answer.status in (200, 202), answer
    if answer.status == 200:
        return str(answer.body["outcome"])

    async def counted() -> str | None:
        grown = webhook_outcomes(await scrape(app), before)
        return next(iter(grown), None)

    return await eventually(counted, 10, "the delivery's work to settle")


def polls_of(fake: FakeOpenAI, response_id: str) -> int:
    """How often the worker retrieved one response."""
    return sum(
        1
        for r in fake.requests
        if r.endpoint == "responses.retrieve" and r.path.endswith(f"/responses/{response_id}")
    )


async def fake_client(fake: FakeOpenAI) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)


def test_a_response_that_ends_before_its_step_is_stored_is_not_left_to_the_safety_net(
    storage: StorageEnv,
) -> None:
    """A response of 20 ms: its webhook can come before the step that created it has stored
    it. The receiver looks again moments later instead of leaving the run to a 30 s poll."""

    async def body(storage: StorageEnv, fake: FakeOpenAI, app: App, replies: ReplyQueue) -> None:
        fake.configure_webhooks(hook_url(app), SECRET)
        for n in range(3):
            sent = await post(storage, replies, f"quick {n}")
            await replies.wait_for("assistantReply", 20, count=n + 1)
            waited = time.monotonic() - sent
            assert waited < 8, f"reply {n} took {waited:.1f} s"

    scenario(storage, body, delay=0.02, WORKER_WEBHOOK_POLL_BACKOFF="30")


def test_the_route_is_off_by_default_and_alone_on_its_own_port(storage: StorageEnv) -> None:
    async def main() -> None:
        async with FakeOpenAI() as fake:
            off = http_settings(storage, **model_env(fake.base_url))
            async with serving(off) as app:
                assert app.webhook_http is None
                answer = await deliver(hook_url(app), *signed(ended("resp_x")))
                assert answer.status == 404
            alone = settings_for(storage, fake, WORKER_WEBHOOK_PORT="0")
            async with serving(alone) as app:
                assert app.http is not None and app.webhook_http is not None
                main_port = f"http://127.0.0.1:{app.http.port}"
                hook_port = f"http://127.0.0.1:{app.webhook_http.port}"
                assert await settle(app, hook_url(app), signed(ended("resp_x"))) == "unknown"
                async with aiohttp.ClientSession() as session:
                    async with session.post(main_port + PATH, data=b"{}") as response:
                        assert response.status == 404
                    for path in ("/healthz", "/metrics", "/assistants/x"):
                        async with session.get(hook_port + path) as response:
                            assert response.status in (404, 405), path

    run(main())


# --- the pure parts ----------------------------------------------------------------------------


def a_run(**changes: Any) -> Run:
    now = datetime.now(UTC)
    base = Run(
        run_id="run_1",
        seq=1,
        status="in_progress",
        request_id="r",
        user_message="hi",
        api="responses",
        model=MODEL,
        created_at=now,
        expires_at=now + timedelta(minutes=10),
        step=3,
        phase="poll",
        handle={"responseId": "resp_a"},
    )
    return replace(base, **changes)


def test_what_an_ended_response_means_for_a_run() -> None:
    assert wake(a_run(), "resp_a") == "continued"
    assert wake(None, "resp_a") == "unknown"
    assert wake(a_run(api="chat"), "resp_a") == "unknown"
    assert wake(a_run(status="completed"), "resp_a") == "finished"
    # An older response of the run (its first round), or a step that is not a poll.
    assert wake(a_run(handle={"responseId": "resp_b"}), "resp_a") == "moved_on"
    assert wake(a_run(phase="tools"), "resp_a") == "moved_on"
    # The response its model step is creating right now, not stored yet; or stored already.
    assert wake(a_run(phase="model", handle={"responseId": "resp_old"}), "resp_a") == "early"
    assert wake(a_run(phase="model", handle={}), "resp_a") == "early"
    assert wake(a_run(phase="model"), "resp_a") == "moved_on"


def test_webhook_ids_are_remembered_for_a_while_and_bounded() -> None:
    seen = SeenIds(keep_for=10, limit=3)
    assert seen.add("a", 0) and not seen.add("a", 5)
    assert seen.add("a", 11)  # forgotten after keep_for: a replay that old is refused anyway
    for name in ("b", "c", "d"):
        assert seen.add(name, 12)
    assert seen.add("a", 12)  # evicted by the bound
    seen.forget("d")
    assert seen.add("d", 12)

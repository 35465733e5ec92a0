"""The HTTP server of ``WORKER_HTTP_PORT`` with a real worker on Azurite: the probes, the
query API, and readiness while draining or while storage is down.

The worker runs in-process (``open_app`` starts the server on a free port); requests go over
real HTTP. Every wait is bounded.
"""

import asyncio
import signal
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError

from tests.support.env import StorageEnv, read_log, run
from tests.support.processes import WorkerProcess, wait_until
from tests.support.runs import (
    WEATHER_ANSWER,
    create_body,
    eventually,
    model_env,
    post_body,
    runs_finished,
    serving,
    tool_registry,
)
from tests.support.scrape import fetch, http_settings, scrape, value
from worker.app import App, open_app
from worker.devtools.azurite import SplitAzurite
from worker.testing import FakeOpenAI

QUESTION = "What's the weather like right now in my favorite city?"


async def ready(app: App) -> bool:
    reply = await fetch(app, "/readyz")
    return reply.status == 200


async def finished(storage: StorageEnv, chat_id: str) -> bool:
    """Whether the chat's one run has ended (False while its table does not exist yet)."""
    try:
        return await runs_finished(storage, chat_id, storage.table, 1) is not None
    except ResourceNotFoundError:
        return False


def test_probes_and_the_query_api(storage: StorageEnv) -> None:
    """/healthz and /readyz answer 200 once the queues exist; GET /assistants/{id} with a key
    (the keys themselves: tests/test_http_query.py) returns the chat's AssistantState
    (filtered by timestampUtc), 404 for a chat or table that does not exist (without creating
    the table), 400 for a bad time, table name or id; no endpoint accepts a write."""
    chat_id = f"http-{storage.suffix}"
    key = "probe-and-query-test-key"
    auth = {"Authorization": f"Bearer {key}"}

    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            settings = http_settings(storage, **model_env(fake.base_url), WORKER_QUERY_KEYS=key)
            async with serving(settings) as app:
                health = await fetch(app, "/healthz")
                assert health.status == 200, health.text
                await eventually(lambda: ready(app), 10, "/readyz to answer 200")
                reply = await fetch(app, "/readyz")
                assert reply.json == {"ready": True, "reasons": []}

                await storage.send(create_body(chat_id, storage.table))
                await storage.send(post_body(chat_id, storage.table, QUESTION))
                await eventually(lambda: finished(storage, chat_id), 30, "the run")

                found = await fetch(
                    app, f"/assistants/{chat_id}", headers=auth, collectionName=storage.table
                )
                assert found.status == 200, found.text
                state = found.json
                assert (state["id"], state["exists"]) == (chat_id, True)
                assert state["totalMessages"] == 8
                assert state["totalTokens"] > 0
                roles = [m["role"] for m in state["recentMessages"]]
                assert roles == [
                    "System",
                    "User",
                    "Assistant",
                    "Tool",
                    "Assistant",
                    "Tool",
                    "Tool",
                    "Assistant",
                ]
                assert state["recentMessages"][-1]["content"] == WEATHER_ANSWER
                assert isinstance(state["recentMessages"][2]["toolCalls"], str)
                assert [r["status"] for r in state["runs"]] == ["completed"]

                # timestampUtc: only the messages created after it.
                later = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
                newer = await fetch(
                    app,
                    f"/assistants/{chat_id}",
                    headers=auth,
                    collectionName=storage.table,
                    timestampUtc=later,
                )
                assert newer.status == 200, newer.text
                assert newer.json["recentMessages"] == []
                assert newer.json["totalMessages"] == 8
                earlier = await fetch(
                    app,
                    f"/assistants/{chat_id}",
                    headers=auth,
                    collectionName=storage.table,
                    timestampUtc="2000-01-01T00:00:00",
                )
                assert len(earlier.json["recentMessages"]) == 8

                # Not found: an unknown chat, and a table that does not exist (not created).
                missing = await fetch(
                    app, "/assistants/nobody", headers=auth, collectionName=storage.table
                )
                assert missing.status == 404, missing.text
                assert "nobody" in missing.json["error"]
                no_table = f"Missing{storage.suffix}"
                absent = await fetch(
                    app, f"/assistants/{chat_id}", headers=auth, collectionName=no_table
                )
                assert absent.status == 404, absent.text
                async with storage.tables() as service:
                    tables = [t.name async for t in service.list_tables()]
                assert no_table not in tables

                # Bad requests.
                bad_time = await fetch(
                    app,
                    f"/assistants/{chat_id}",
                    headers=auth,
                    collectionName=storage.table,
                    timestampUtc="yesterday",
                )
                assert bad_time.status == 400, bad_time.text
                assert "timestampUtc" in bad_time.json["error"]
                bad_table = await fetch(
                    app, f"/assistants/{chat_id}", headers=auth, collectionName="no_such!"
                )
                assert bad_table.status == 400, bad_table.text
                assert "collectionName" in bad_table.json["error"]
                bad_id = await fetch(
                    app, "/assistants/a%01b", headers=auth, collectionName=storage.table
                )
                assert bad_id.status == 400, bad_id.text

                # Nothing writes: other methods are refused, unknown paths are 404.
                for method in ("POST", "PUT", "DELETE"):
                    refused = await fetch(
                        app, f"/assistants/{chat_id}", method=method, headers=auth
                    )
                    assert refused.status == 405, (method, refused.status)
                assert (await fetch(app, "/nothing-here")).status == 404
                rows = await storage.partition(chat_id, storage.table)
                assert "state" in rows

    run(scenario())


def test_readyz_is_503_while_draining_and_healthz_after_the_stop(storage: StorageEnv) -> None:
    """After stop() (SIGTERM), with a message still in flight (a slow model call): /readyz says
    503 "draining" while /healthz stays 200; the in-flight message is abandoned after the
    grace period and counted; once the loop has stopped, /healthz is 503 too."""
    chat_id = f"drain-{storage.suffix}"

    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            fake.fault("slow", delay=30, model="slow-bot")
            settings = http_settings(
                storage,
                **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME="slow-bot"),
                WORKER_SHUTDOWN_GRACE="1",
            )
            async with open_app(settings, tools=tool_registry()) as app:
                task = asyncio.create_task(app.worker.run())
                try:
                    await eventually(lambda: ready(app), 10, "/readyz to answer 200")
                    await storage.send(create_body(chat_id, storage.table))
                    await storage.send(post_body(chat_id, storage.table, "hello?"))

                    async def model_call_in_flight() -> bool:
                        samples = await scrape(app)
                        calls = [r for r in fake.requests if r.endpoint == "chat.create"]
                        return (
                            bool(calls)
                            and value(samples, "assistant_worker_in_flight_messages") >= 1
                        )

                    await eventually(model_call_in_flight, 30, "the slow model call")
                    app.worker.stop()
                    draining = await fetch(app, "/readyz")
                    assert draining.status == 503, draining.text
                    assert any("draining" in reason for reason in draining.json["reasons"])
                    assert (await fetch(app, "/healthz")).status == 200
                    await asyncio.wait_for(asyncio.shield(task), 20)
                    assert (await fetch(app, "/healthz")).status == 503
                    samples = await scrape(app)
                    assert (
                        value(
                            samples,
                            "assistant_worker_messages_total",
                            queue=storage.runs_queue,
                            type="unknown",
                            outcome="abandoned",
                        )
                        + value(
                            samples,
                            "assistant_worker_messages_total",
                            queue=storage.requests_queue,
                            type="unknown",
                            outcome="abandoned",
                        )
                        == 1
                    )
                    assert value(samples, "assistant_worker_in_flight_messages") == 0
                finally:
                    app.worker.stop()
                    await asyncio.wait_for(task, 20)

    run(scenario())


def test_readyz_is_503_while_storage_is_down(storage: StorageEnv) -> None:
    """While the worker's storage is marked down (the loop's outage pause calls
    Health.mark_storage_down), /readyz is 503 with the reason and storage_paused is 1; when
    it is up again, both recover. /healthz stays 200 throughout."""

    async def scenario() -> None:
        async with serving(http_settings(storage)) as app:
            await eventually(lambda: ready(app), 10, "/readyz to answer 200")
            assert value(await scrape(app), "assistant_worker_storage_paused") == 0
            app.health.mark_storage_down("the table service refused 3 requests in a row")
            down = await fetch(app, "/readyz")
            assert down.status == 503, down.text
            [reason] = down.json["reasons"]
            assert "storage unreachable" in reason
            assert "refused 3 requests" in reason
            assert (await fetch(app, "/healthz")).status == 200
            assert value(await scrape(app), "assistant_worker_storage_paused") == 1
            app.health.mark_storage_up()
            assert (await fetch(app, "/readyz")).status == 200
            assert value(await scrape(app), "assistant_worker_storage_paused") == 0

    run(scenario())


def test_the_run_command_serves_http_until_it_has_drained(
    storage: StorageEnv, tmp_path: Path
) -> None:
    """``assistant-worker run`` with WORKER_HTTP_PORT: the probes and /metrics answer over
    HTTP; on SIGTERM the worker drains, then the server stops, and the process exits 0. No
    warning about a missing server any more."""
    env = storage.env(WORKER_HTTP_PORT="0", WORKER_HTTP_HOST="127.0.0.1")
    with WorkerProcess(env, tmp_path / "worker.log") as worker:
        [started] = worker.wait_for_events("http.started", 1, timeout=30)
        url = f"http://127.0.0.1:{started['port']}"

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url + path, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()

        assert get("/healthz")[0] == 200
        wait_until(lambda: get("/readyz")[0] == 200, timeout=20, what="/readyz 200")
        status, text = get("/metrics")
        assert status == 200
        assert "assistant_worker_in_flight_messages 0.0" in text
        assert "assistant_worker_storage_requests_total{" in text
        worker.signal(signal.SIGTERM)
        assert worker.wait_exit(30) == 0
    names = [event.get("event") for event in read_log(tmp_path / "worker.log")]
    assert (
        names.index("worker.stopped") < names.index("http.stopped") < names.index("worker.exited")
    )
    assert "http.not_available" not in names


def test_readyz_follows_a_real_table_outage(split_azurite: SplitAzurite) -> None:
    """The table service stops (the queue service still answers): once the worker confirms
    the outage, /readyz is 503 naming it and storage_paused is 1; when the table service is
    back, both recover and the request sent during the outage is applied, not dead-lettered."""
    storage = StorageEnv.fresh(split_azurite)

    async def scenario() -> None:
        async with serving(http_settings(storage)) as app:
            await eventually(lambda: ready(app), 10, "/readyz to answer 200")
            await storage.send(create_body("before", storage.table))
            await eventually(lambda: chat_exists(storage, "before"), 20, "the first chat")

            split_azurite.stop_table()
            try:
                await storage.send(create_body("during", storage.table))

                async def not_ready() -> list[str] | None:
                    reply = await fetch(app, "/readyz")
                    return reply.json["reasons"] if reply.status == 503 else None

                reasons = await eventually(not_ready, 60, "/readyz to report the outage")
                assert any("storage unreachable" in reason for reason in reasons), reasons
                assert value(await scrape(app), "assistant_worker_storage_paused") == 1
                assert (await fetch(app, "/healthz")).status == 200
            finally:
                split_azurite.start_table()
            await eventually(lambda: ready(app), 60, "/readyz to recover")
            await eventually(lambda: chat_exists(storage, "during"), 30, "the chat sent meanwhile")
            assert value(await scrape(app), "assistant_worker_storage_paused") == 0
        assert await storage.count(storage.requests_poison) == 0

    run(scenario())


async def chat_exists(storage: StorageEnv, chat_id: str) -> bool:
    try:
        rows = await storage.partition(chat_id, storage.table)
    except Exception:  # the table service is down or the table not created yet
        return False
    return bool(rows.get("state", {}).get("Exists"))

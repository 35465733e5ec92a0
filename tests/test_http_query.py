"""The query API needs a key (``WORKER_QUERY_KEYS``): a real worker app on Azurite, its HTTP
server on a free port, every request over real HTTP.

Unset, the route does not exist (404, whatever the request carries). Set, a request carries
``Authorization: Bearer <key>`` or ``x-functions-key: <key>``, any of the keys listed (several,
for rotation); anything else is 401 with ``WWW-Authenticate: Bearer``. The probes and
``/metrics`` stay open. The reader keeps a bounded number of table clients however many
``collectionName`` values callers name, and the keys never reach the logs or dead letters.
"""

import asyncio
import json
import secrets
import signal
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.env import StorageEnv
from tests.support.processes import WorkerProcess
from tests.support.runs import create_body, eventually, serving
from tests.support.scrape import Reply, fetch, http_settings
from worker.app import App
from worker.http.query import QueryRoutes

INSTRUCTIONS = "You are a weather bot."


def new_key() -> str:
    return secrets.token_urlsafe(24)


async def chat_exists(storage: StorageEnv, chat_id: str) -> bool:
    try:
        rows = await storage.partition(chat_id, storage.table)
    except Exception:  # the table is not created yet
        return False
    return bool(rows.get("state", {}).get("Exists"))


async def created(storage: StorageEnv, chat_id: str) -> None:
    await storage.send(create_body(chat_id, storage.table, instructions=INSTRUCTIONS))
    await eventually(lambda: chat_exists(storage, chat_id), 30, f"chat {chat_id}")


def query_routes(app: App) -> QueryRoutes | None:
    assert app.http is not None
    found = [family for family in app.http.families if isinstance(family, QueryRoutes)]
    return found[0] if found else None


async def probes_answer_without_a_key(app: App) -> None:
    for path in ("/healthz", "/metrics"):
        reply = await fetch(app, path)
        assert reply.status == 200, (path, reply.text)
    reply = await fetch(app, "/readyz")
    assert reply.status in (200, 503) and reply.json is not None, reply.text


def test_without_keys_the_query_route_does_not_exist(storage: StorageEnv) -> None:
    """WORKER_QUERY_KEYS unset: GET /assistants/{id} of a chat that exists answers 404 as an
    unknown path does (no JSON error naming the chat), with or without a key-like header;
    other methods too; the probes and /metrics answer."""
    chat_id = f"nokeys-{storage.suffix}"

    async def scenario() -> None:
        async with serving(http_settings(storage)) as app:
            await created(storage, chat_id)
            unknown = await fetch(app, "/nothing-here")
            assert unknown.status == 404
            for headers in ({}, {"Authorization": "Bearer anything-at-all-123456"}):
                reply = await fetch(
                    app, f"/assistants/{chat_id}", headers=headers, collectionName=storage.table
                )
                assert reply.status == 404, reply.text
                assert (reply.text, reply.json) == (unknown.text, None), "no hint of the route"
                assert INSTRUCTIONS not in reply.text
            for method in ("POST", "DELETE"):
                assert (await fetch(app, f"/assistants/{chat_id}", method=method)).status == 404
            assert query_routes(app) is None, "no reader is opened without keys"
            await probes_answer_without_a_key(app)

    asyncio.run(scenario())


def refused(reply: Reply) -> bool:
    return (
        reply.status == 401
        and reply.headers.get("WWW-Authenticate") == "Bearer"
        and INSTRUCTIONS not in reply.text
    )


def test_the_query_answers_only_with_one_of_the_keys(storage: StorageEnv) -> None:
    """Two keys (a rotation): each one, in either header (the scheme in any case), reads the
    chat; no header, an empty or wrong key, a key's prefix or extension, another scheme, or
    the key in the wrong header is 401 with WWW-Authenticate: Bearer, for a chat that exists
    and one that does not (a caller without a key learns nothing); the probes stay open."""
    chat_id = f"keys-{storage.suffix}"
    old, new = new_key(), new_key()

    async def scenario() -> None:
        settings = http_settings(storage, WORKER_QUERY_KEYS=f" {new} , {old} ")
        async with serving(settings) as app:
            await created(storage, chat_id)

            async def get(headers: dict[str, str], chat: str = chat_id) -> Reply:
                return await fetch(
                    app, f"/assistants/{chat}", headers=headers, collectionName=storage.table
                )

            wrong = [
                {},
                {"Authorization": ""},
                {"Authorization": "Bearer"},
                {"Authorization": "Bearer "},
                {"Authorization": f"Bearer {new_key()}"},
                {"Authorization": f"Bearer {new[:-1]}"},
                {"Authorization": f"Bearer {new}x"},
                {"Authorization": f"Bearer {new},{old}"},
                {"Authorization": f"Basic {new}"},
                {"Authorization": new},
                {"Authorization": f"Token {old}"},
                {"x-functions-key": ""},
                {"x-functions-key": new_key()},
                {"x-functions-key": f"Bearer {new}"},
                {"x-api-key": new},
                {"Authorization": "Bearer ünïcödé-kéy-123456789"},
            ]
            for headers in wrong:
                reply = await get(headers)
                assert refused(reply), (headers, reply.status, reply.text)
            assert refused(await get({}, chat="nobody"))
            assert refused(await fetch(app, f"/assistants/{chat_id}?code={new}"))

            right = [
                {"Authorization": f"Bearer {new}"},
                {"Authorization": f"Bearer {old}"},
                {"Authorization": f"bearer {old}"},
                {"x-functions-key": new},
                {"X-Functions-Key": old},
            ]
            for headers in right:
                reply = await get(headers)
                assert reply.status == 200, (headers, reply.text)
                assert reply.json["id"] == chat_id and reply.json["exists"] is True
                assert reply.json["recentMessages"][0]["content"] == INSTRUCTIONS
            missing = await get({"Authorization": f"Bearer {new}"}, chat="nobody")
            assert missing.status == 404, missing.text
            await probes_answer_without_a_key(app)

    asyncio.run(scenario())


def test_the_reader_keeps_a_bounded_number_of_tables(storage: StorageEnv) -> None:
    """Callers naming ever new collectionName values (each a table that does not exist): the
    reader keeps at most its bound of table clients, least recently used out; a table used
    again after its eviction reads as before. Refused callers open nothing."""
    chat_id = f"bounded-{storage.suffix}"
    key = new_key()
    auth = {"Authorization": f"Bearer {key}"}

    async def scenario() -> None:
        async with serving(http_settings(storage, WORKER_QUERY_KEYS=key)) as app:
            await created(storage, chat_id)
            routes = query_routes(app)
            assert routes is not None
            reader = routes.stores
            bound = reader.max_tables
            assert 1 <= bound <= 256

            for number in range(bound * 2):
                reply = await fetch(
                    app,
                    f"/assistants/{chat_id}",
                    collectionName=f"Refused{number}x{storage.suffix}",
                )
                assert reply.status == 401
            assert reader.open_tables == 0, "a refused request opens no table client"

            first = await fetch(
                app, f"/assistants/{chat_id}", headers=auth, collectionName=storage.table
            )
            assert first.status == 200, first.text
            for number in range(bound * 3):
                reply = await fetch(
                    app,
                    f"/assistants/{chat_id}",
                    headers=auth,
                    collectionName=f"Nowhere{number}x{storage.suffix}",
                )
                assert reply.status == 404, reply.text
                assert reader.open_tables <= bound
            assert reader.open_tables == bound
            again = await fetch(
                app, f"/assistants/{chat_id}", headers=auth, collectionName=storage.table
            )
            assert again.status == 200, again.text
            assert again.json == first.json
            assert reader.open_tables == bound

    asyncio.run(scenario())


def test_the_keys_never_reach_the_logs_or_dead_letters(storage: StorageEnv, tmp_path: Path) -> None:
    """``assistant-worker run`` with two keys: requests with the right and wrong keys, and a
    message that names a key (an unknown message type, dead-lettered with a reason that quotes
    it). The log masks it, the dead letter too, and neither key appears anywhere in the log."""
    first, second = new_key(), new_key()
    env = storage.env(
        WORKER_HTTP_PORT="0", WORKER_HTTP_HOST="127.0.0.1", WORKER_QUERY_KEYS=f"{first},{second}"
    )
    log = tmp_path / "worker.log"
    with WorkerProcess(env, log) as worker:
        [started] = worker.wait_for_events("http.started", 1, timeout=30)
        url = f"http://127.0.0.1:{started['port']}/assistants/nobody"

        def status(headers: dict[str, str]) -> int:
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code

        assert status({"Authorization": f"Bearer {first}"}) == 404
        assert status({"x-functions-key": second}) == 404
        assert status({"Authorization": f"Bearer {first}{second}"}) == 401
        assert status({"x-functions-key": f"{second}-not"}) == 401

        asyncio.run(storage.send({"type": first, "id": "leak", "requestId": second}))
        [dead] = worker.wait_for_events("message.dead_lettered", 1, timeout=30)
        worker.signal(signal.SIGTERM)
        assert worker.wait_exit(30) == 0
    assert "***" in json.dumps(dead), dead
    text = log.read_text(errors="replace")
    for key in (first, second):
        assert key not in text, "a query key reached the log"
    [letter] = asyncio.run(storage.peek_all(storage.requests_poison))
    for key in (first, second):
        assert key not in letter, "a query key reached a dead letter"

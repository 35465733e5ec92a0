"""``GET /assistants/{id}?timestampUtc=&collectionName=``: the chat's ``AssistantState``,
read from the worker's own storage account without creating anything.

Served only with ``WORKER_QUERY_KEYS`` set (``build_server`` leaves the route out otherwise):
a request without one of the keys is 401 before anything is read or parsed, so a caller
without a key learns nothing, not even whether a chat exists. Then: 404 when the chat does
not exist, 400 for a bad id, time or table name.
"""

from datetime import UTC, datetime

from aiohttp import web

from handlers.query import get_state
from schemas.names import MAX_ID_LENGTH, check_key, check_table_name
from worker.config.redact import Redactor
from worker.http.keys import CHALLENGE, QueryKeys, presented_keys
from worker.loop.errors import PermanentError, TransientError
from worker.store.stores import ReadOnlyStores

DEFAULT_TABLE = "ChatState"


class BadRequest(ValueError):
    """A query parameter or path part that cannot be used; the message says which and why."""


def parse_timestamp(text: str) -> datetime:
    """An ISO-8601 time (``Z`` or an offset; UTC when none), as the extension's
    ``timestampUtc``."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"timestampUtc {text[:100]!r} is not an ISO-8601 time, e.g. 2026-01-31T12:00:00Z"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def check_chat_id(chat_id: str) -> str:
    if not 1 <= len(chat_id) <= MAX_ID_LENGTH:
        raise BadRequest(f"the assistant id must be 1-{MAX_ID_LENGTH} characters")
    try:
        return check_key(chat_id)
    except ValueError as error:
        raise BadRequest(f"the assistant id {error}") from None


class QueryRoutes:
    """The query route family."""

    def __init__(self, stores: ReadOnlyStores, redactor: Redactor, keys: QueryKeys) -> None:
        if not keys:
            raise ValueError("the query is served only with WORKER_QUERY_KEYS set")
        self.stores = stores
        self._redact = redactor
        self._keys = keys

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/assistants/{id}", self._assistant)]

    async def close(self) -> None:
        await self.stores.close()

    async def _assistant(self, request: web.Request) -> web.Response:
        if not self._keys.accepts(presented_keys(request.headers)):
            return web.json_response(
                {
                    "error": "this route needs a key: send 'Authorization: Bearer <key>' or "
                    "'x-functions-key: <key>' with one of the keys of WORKER_QUERY_KEYS"
                },
                status=401,
                headers={"WWW-Authenticate": CHALLENGE},
            )
        response = await self._answer(request)
        # Chat content: no proxy or browser keeps a copy.
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        try:
            chat_id = check_chat_id(request.match_info["id"])
            text = request.query.get("timestampUtc")
            since = parse_timestamp(text) if text else None
            table = request.query.get("collectionName") or DEFAULT_TABLE
            try:
                check_table_name(table)
            except ValueError as error:
                raise BadRequest(f"collectionName {error}") from None
        except BadRequest as error:
            return web.json_response({"error": str(error)}, status=400)
        try:
            # A table that does not exist holds no chat.
            state = await get_state(await self.stores.get(table), chat_id, since)
        except TransientError as error:
            return web.json_response({"error": self._redact(error.reason)}, status=503)
        except PermanentError as error:
            return web.json_response({"error": self._redact(error.reason)}, status=502)
        if not state.exists:
            return web.json_response(
                {"error": f"assistant {chat_id!r} does not exist in table {table!r}"}, status=404
            )
        return web.json_response(state.to_wire())

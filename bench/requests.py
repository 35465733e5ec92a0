"""Counting storage requests from Azurite's ``--debug`` log (see ``../shared/NOTES.md``).

Azurite started with ``--debug FILE`` logs every request as a line
``... (Queue|Table)StorageContextMiddleware: RequestMethod=GET RequestURL=... RequestHeaders:{...}``
and then, under the same request id, its operation (``DispatchMiddleware: Operation=...``), the
entities a query returned and its status. The benchmark's own clients put ``BENCH_USER_AGENT``
first in their user-agent (``bench_queue_service``/``bench_table_service``); every other request
is the worker's.

``RequestLog.mark()`` sends a request to a unique, made-up queue URL and waits until Azurite has
logged it: everything logged before the mark happened before it, so two marks bound a phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import BENCH_USER_AGENT, table

if TYPE_CHECKING:
    from azure.data.tables.aio import TableServiceClient
    from azure.storage.queue.aio import QueueServiceClient

    from worker.devtools.azurite import Azurite

_LINE = re.compile(r"^\S+ (?P<id>[0-9a-f-]{36}) \w+: (?P<text>.*)$")
_REQUEST = re.compile(
    r"(?P<service>Queue|Table)StorageContextMiddleware: RequestMethod=(?P<method>[A-Z]+) "
    r"RequestURL=(?P<url>\S+)"
)
_AGENT = re.compile(r'"user-agent":"(?P<agent>[^"]*)"')
_OPERATION = re.compile(r"DispatchMiddleware: Operation=(?P<operation>\w+)")
_STATUS = re.compile(r"EndMiddleware: End response\. TotalTimeInMS=\d+ StatusCode=(?P<status>\d+)")
_ENTITIES = "TableHandler:queryEntities() Raw response string is"
_DEQUEUED = re.compile(r"<QueueMessage>")

# The kinds of the figures, in its order.
KINDS = (
    "Table GET",
    "Table POST",
    "Table PUT",
    "Table PATCH",
    "Table MERGE",
    "Table DELETE",
    "Queue GET",
    "Queue POST",
    "Queue PUT",
    "Queue DELETE",
)


@dataclass
class StorageRequest:
    """One request Azurite received."""

    offset: int  # byte offset of its first log line
    request_id: str
    service: str  # "Queue" or "Table"
    method: str
    url: str
    user_agent: str
    operation: str | None = None
    status: int | None = None
    # Table queries: the entities returned; queue receives: the messages returned.
    items: int | None = None

    @property
    def kind(self) -> str:
        return f"{self.service} {self.method}"

    @property
    def is_bench(self) -> bool:
        return self.user_agent.startswith(BENCH_USER_AGENT)


class RequestLog:
    """Azurite's ``--debug`` file, parsed on demand."""

    def __init__(self, path: Path, azurite: Azurite) -> None:
        self.path = path
        self._azurite = azurite

    def mark(self, timeout: float = 15.0) -> int:
        """Offset in the log before which every request received so far is logged."""
        token = f"mark{uuid.uuid4().hex[:20]}"
        url = f"http://127.0.0.1:{self._azurite.queue_port}/{self._azurite.account_name}/{token}"
        request = urllib.request.Request(
            url + "?comp=metadata", headers={"User-Agent": f"{BENCH_USER_AGENT}-mark"}
        )
        # Unauthenticated: refused, but logged first.
        with contextlib.suppress(urllib.error.HTTPError, urllib.error.URLError, OSError):
            urllib.request.urlopen(request, timeout=5).close()
        deadline = time.monotonic() + timeout
        needle = token.encode()
        while time.monotonic() < deadline:
            data = self.path.read_bytes() if self.path.exists() else b""
            found = data.rfind(needle)
            if found >= 0:
                return data.rfind(b"\n", 0, found) + 1
            time.sleep(0.02)
        raise TimeoutError(f"Azurite did not log the mark {token} within {timeout} s")

    async def amark(self) -> int:
        """``mark()`` off the event loop."""
        return await asyncio.to_thread(self.mark)

    def requests(self) -> list[StorageRequest]:
        """Every request in the log so far, oldest first."""
        by_id: dict[str, StorageRequest] = {}
        order: list[StorageRequest] = []
        offset = 0
        with self.path.open("rb") as log:
            for raw in log:
                start, offset = offset, offset + len(raw)
                line = raw.decode("utf-8", "replace")
                match = _LINE.match(line)
                if match is None:
                    continue
                request_id, text = match.group("id"), match.group("text")
                request = _REQUEST.match(text)
                if request is not None:
                    agent = _AGENT.search(text)
                    entry = StorageRequest(
                        offset=start,
                        request_id=request_id,
                        service=request.group("service"),
                        method=request.group("method"),
                        url=request.group("url"),
                        user_agent=agent.group("agent") if agent else "",
                    )
                    by_id[request_id] = entry
                    order.append(entry)
                    continue
                entry = by_id.get(request_id)  # type: ignore[assignment]
                if entry is None:
                    continue
                if (operation := _OPERATION.search(text)) is not None:
                    entry.operation = operation.group("operation")
                elif (status := _STATUS.search(text)) is not None:
                    entry.status = int(status.group("status"))
                elif _ENTITIES in text:
                    entry.items = text.count("odata.etag")
                elif entry.operation == "Messages_Dequeue" and "<QueueMessagesList" in text:
                    entry.items = len(_DEQUEUED.findall(text))
        return order

    def worker_requests(self, start: int, end: int | None = None) -> list[StorageRequest]:
        """The worker's requests logged between two marks."""
        return [
            r
            for r in self.requests()
            if r.offset >= start and (end is None or r.offset < end) and not r.is_bench
        ]


def by_kind(requests: Iterable[StorageRequest]) -> Counter[str]:
    """Counts by ``"Table GET"``, ``"Queue DELETE"``..."""
    return Counter(r.kind for r in requests)


def by_operation(requests: Iterable[StorageRequest]) -> Counter[str]:
    """Counts by Azurite's operation name (``Table_QueryEntities``, ``Messages_Dequeue``...),
    empty receives apart."""
    counts: Counter[str] = Counter()
    for r in requests:
        name = r.operation or r.kind
        if r.operation == "Messages_Dequeue" and r.items == 0:
            name += " (empty)"
        counts[name] += 1
    return counts


def entities_read(requests: Iterable[StorageRequest]) -> int:
    """Entities returned by the table queries (point reads count one)."""
    total = 0
    for r in requests:
        if r.service != "Table" or r.method != "GET":
            continue
        total += r.items if r.items is not None else 1
    return total


def kinds_table(columns: dict[str, Counter[str]], kinds: Iterable[str] = KINDS) -> str:
    """One row per kind of request, one column per measured case; kinds never seen left out."""
    names = list(columns)
    seen = [k for k in kinds if any(columns[n][k] for n in names)]
    extra = sorted({k for n in names for k in columns[n]} - set(seen) - set(kinds))
    rows = [(k, *(columns[n][k] for n in names)) for k in [*seen, *extra]]
    rows.append(("**total**", *(sum(columns[n].values()) for n in names)))
    return table(["requests", *names], rows)


def bench_queue_service(connection: str) -> QueueServiceClient:
    """A queue client of the benchmark itself (tagged, so its requests are not counted)."""
    from azure.storage.queue.aio import QueueServiceClient

    return QueueServiceClient.from_connection_string(connection, user_agent=BENCH_USER_AGENT)


def bench_table_service(connection: str) -> TableServiceClient:
    """A table client of the benchmark itself (tagged, so its requests are not counted)."""
    from azure.data.tables.aio import TableServiceClient

    return TableServiceClient.from_connection_string(connection, user_agent=BENCH_USER_AGENT)

"""The long-lived parts every run handler uses, and where a chat lives."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from handlers.tools import ToolRegistry
from worker.backends.base import Backend, TurnRequest
from worker.config.settings import Settings
from worker.runs.model import Run
from worker.store.protocol import ChatStore
from worker.store.stores import ChatStores
from worker.streaming.sinks import StreamSinks

if TYPE_CHECKING:
    # Loaded by the wiring only when WORKER_MCP_SERVERS names a server.
    from worker.mcp.servers import McpServers

log = structlog.get_logger("worker.runs")


@dataclass(frozen=True)
class ChatRef:
    """Where a chat lives: its id, storage setting and table."""

    chat_id: str
    storage_setting: str
    collection: str


@dataclass
class RunServices:
    """The long-lived parts the run handlers use."""

    stores: ChatStores
    settings: Settings
    backends: Mapping[str, Backend]
    tools: ToolRegistry
    clock: Callable[[], datetime]
    # Masks the worker's secrets in texts that leave it (run errors in replies).
    redact: Callable[[str], str] = lambda text: text
    # The MCP servers of WORKER_MCP_SERVERS (None when it names none).
    mcp: "McpServers | None" = None
    # Where streamed runs send their deltas (SPEC §5.4); None: nothing streams.
    streams: StreamSinks | None = None

    async def store(self, chat: ChatRef) -> ChatStore:
        return await self.stores.get(chat.storage_setting, chat.collection)

    async def cancel_remote(self, run: Run, remote: Mapping[str, Any]) -> None:
        """Stop the backend work of a run the worker abandons (expired, failed, cancelled,
        its chat deleted or reset): a background response or remote run would otherwise go
        on burning tokens. Best effort: a failure is logged, never raised."""
        backend = self.backends.get(run.api)
        if backend is None or not (run.handle or remote):
            return
        request = TurnRequest(
            chat_id="",
            run_id=run.run_id,
            model=run.model,
            messages=(),
            handle=dict(run.handle),
            remote=dict(remote),
            ai_connection=run.params.get("aiConnectionName"),
        )
        try:
            await backend.cancel(request)
        except Exception as error:
            log.warning(
                "run.cancel_remote_failed", run_id=run.run_id, error=self.redact(str(error))
            )

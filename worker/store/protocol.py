"""What the handlers need from a chat store: one chat partition's reads and guarded writes.

``worker.store.tables.TableChatStore`` implements it on Azure Table Storage. The handlers are
typed against this protocol, so that they never reach into the table client, and the rules a
store must keep (ETag-guarded state, a request's effect written with its applied record in one
transaction, claims created only if absent) are stated in one place: the Table store's docs.
"""

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from worker.runs.model import Run
from worker.store.cache import Committed
from worker.store.claims import Claimed, ClaimResult, NewClaim
from worker.store.layout import AppliedRecord, AppliedRequest, ChatMessage, ChatState
from worker.store.removal import Removal


class Conflict(Exception):
    """A guarded write lost a race: re-read and decide again."""


class ClaimProgress(Protocol):
    """A claim being held: the work may record how far it got in its row."""

    async def save(self, properties: dict[str, Any]) -> None: ...


class ClaimStore(Protocol):
    """Claims on work that must not be done twice (see ``worker.store.claims``)."""

    async def acquire(
        self,
        chat_id: str,
        row_key: str,
        *,
        owner: str,
        value_property: str,
        patience: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> ClaimResult: ...

    def held(
        self, chat_id: str, row_key: str, claim: Claimed
    ) -> AbstractAsyncContextManager[ClaimProgress]: ...

    async def release(self, chat_id: str, row_key: str, claim: Claimed) -> None: ...

    async def start(self, chat_id: str, row_key: str, reserved: Claimed) -> Claimed | None: ...

    async def finish(
        self, chat_id: str, row_key: str, *, value_property: str, value: str, extra: dict[str, Any]
    ) -> None: ...


class ChatStore(Protocol):
    """The chats of one table."""

    @property
    def claims(self) -> ClaimStore: ...

    async def load_state(self, chat_id: str) -> ChatState | None: ...

    async def load_run(self, chat_id: str, run_id: str) -> Run | None: ...

    async def runs(self, chat_id: str) -> list[Run]: ...

    async def next_queued_run(self, chat_id: str, after_seq: int) -> Run | None: ...

    async def read_messages(self, chat_id: str, upto: int | None = None) -> list[ChatMessage]: ...

    async def history(self, state: ChatState) -> list[ChatMessage]: ...

    def committed(self, chat_id: str, run_id: str, *, keep: bool = False) -> Committed | None: ...

    async def applied_run(self, chat_id: str, request_id: str) -> tuple[bool, str | None]: ...

    async def applied_record(self, chat_id: str, request_id: str) -> AppliedRecord | None: ...

    async def tool_results(
        self, chat_id: str, run_id: str, round_number: int
    ) -> dict[str, str]: ...

    async def save_tool_result(
        self, chat_id: str, run_id: str, round_number: int, call_id: str, output: str
    ) -> None: ...

    async def commit(
        self,
        state: ChatState,
        *,
        runs: Sequence[tuple[Run, bool]] = (),
        messages: Sequence[ChatMessage] = (),
        applied: AppliedRequest | None = None,
        deletes: Sequence[str] = (),
        claims: Sequence[NewClaim] = (),
    ) -> None: ...

    async def reset_chat(
        self, state: ChatState, first_message: ChatMessage, applied: AppliedRequest
    ) -> Removal | None: ...

    async def delete_chat(self, chat_id: str, applied: AppliedRequest) -> Removal | None: ...

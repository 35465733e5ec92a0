"""What this process already knows of a chat, so that a step reads only what it has not seen.

Two caches, both advisory: a wrong entry can cost a wasted call, never a wrong write, because
every write is still guarded by the ETags of the rows it read.

- ``HistoryCache``: a chat's messages ``1..k``. Rows up to the state's ``TotalMessages`` never
  change (messages are append-only; a commit writes rows past it under the state row's ETag), so
  a step needs only the rows from ``k + 1``. A reset rewrites the chat from message 1 and gives
  it a new ``CreatedAt``: entries are keyed by it, so a reset made by another worker is noticed
  on the next state read.
- ``CommittedCache``: the ``state`` row and run rows as this process's last commit of a chat
  left them (with their new ETags). The step taken in-process right after that commit starts
  from them instead of reading both again; if another worker wrote meanwhile, the step's commit
  fails its ETag check and reads afresh (see ``handlers.transitions.commit_transition``).
"""

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from worker.runs.model import Run
from worker.store.layout import ChatMessage, ChatState

# Messages kept over all chats (least recently used chats go first); about 1 KiB each on
# average, so some hundred MiB at worst. A chat longer than this alone is not cached.
MAX_CACHED_MESSAGES = 100_000
# Chats whose last commit is remembered for the step taken right after it.
MAX_COMMITTED = 4096


@dataclass
class _History:
    created_at: datetime
    messages: list[ChatMessage]


class HistoryCache:
    """A contiguous prefix of each recently used chat's messages."""

    def __init__(self, max_messages: int = MAX_CACHED_MESSAGES) -> None:
        self._max = max_messages
        self._chats: OrderedDict[str, _History] = OrderedDict()
        self._count = 0

    def get(self, chat_id: str, created_at: datetime | None) -> list[ChatMessage]:
        """The cached messages ``1..k`` of the chat created at ``created_at`` (maybe none)."""
        entry = self._chats.get(chat_id)
        if entry is None or created_at is None or entry.created_at != created_at:
            return []
        self._chats.move_to_end(chat_id)
        return entry.messages

    def put(self, chat_id: str, created_at: datetime | None, messages: list[ChatMessage]) -> None:
        """Remember ``messages`` (``1..k``, in order) as the chat's prefix."""
        self.forget(chat_id)
        if created_at is None or not messages or len(messages) > self._max:
            return
        self._chats[chat_id] = _History(created_at, list(messages))
        self._count += len(messages)
        while self._count > self._max:
            _, evicted = self._chats.popitem(last=False)
            self._count -= len(evicted.messages)

    def extend(
        self, chat_id: str, created_at: datetime | None, messages: list[ChatMessage]
    ) -> None:
        """Append messages just committed, if they follow the cached prefix directly."""
        cached = self.get(chat_id, created_at)
        if not cached or not messages or messages[0].index != len(cached) + 1:
            return
        self.put(chat_id, created_at, [*cached, *messages])

    def has(self, chat_id: str) -> bool:
        return chat_id in self._chats

    def forget(self, chat_id: str) -> None:
        entry = self._chats.pop(chat_id, None)
        if entry is not None:
            self._count -= len(entry.messages)


@dataclass(frozen=True)
class Committed:
    """The rows of one run as a commit left them: ``claims`` are the ETags of the claim rows
    it created (row key -> ETag), held by the worker that made the commit."""

    state: ChatState
    run: Run
    claims: dict[str, str]


class CommittedCache:
    """The state and runs of each chat as this process last committed them."""

    def __init__(self, max_chats: int = MAX_COMMITTED) -> None:
        self._max = max_chats
        self._chats: OrderedDict[str, tuple[ChatState, dict[str, Run], dict[str, str]]] = (
            OrderedDict()
        )

    def put(self, state: ChatState, runs: dict[str, Run], claims: dict[str, str]) -> None:
        self._chats.pop(state.chat_id, None)
        self._chats[state.chat_id] = (state, runs, claims)
        while len(self._chats) > self._max:
            self._chats.popitem(last=False)

    def take(self, chat_id: str, run_id: str) -> Committed | None:
        """The state and the run ``run_id`` of the last commit, once (then forgotten)."""
        entry = self._chats.pop(chat_id, None)
        if entry is None or run_id not in entry[1]:
            return None
        return Committed(entry[0], entry[1][run_id], entry[2])

    def peek(self, chat_id: str, run_id: str) -> Committed | None:
        """The same, left in place (for a reader that only acts on a run that waits)."""
        entry = self._chats.get(chat_id)
        if entry is None or run_id not in entry[1]:
            return None
        return Committed(entry[0], entry[1][run_id], entry[2])

    def forget(self, chat_id: str) -> None:
        self._chats.pop(chat_id, None)

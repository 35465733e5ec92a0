"""What this process already knows of a chat, so that a step reads only what it has not seen.

Two caches, both advisory: a wrong entry can cost a wasted call, never a wrong write, because
every write is still guarded by the ETags of the rows it read. An entry that is missing (never
kept, or evicted) costs a read, nothing else: a copy from the cache may only make a step act,
never drop it (``tests/test_store_cache.py``).

- ``HistoryCache``: a chat's messages ``1..k``. Rows up to the state's ``TotalMessages`` never
  change (messages are append-only; a commit writes rows past it under the state row's ETag), so
  a step needs only the rows from ``k + 1``. A reset rewrites the chat from message 1 and gives
  it a new ``CreatedAt``: entries are keyed by it, so a reset made by another worker is noticed
  on the next state read.
- ``CommittedCache``: the ``state`` row and run rows as this process's last commit of a chat
  left them (with their new ETags). The step taken in-process right after that commit starts
  from them instead of reading both again; if another worker wrote meanwhile, the step's commit
  fails its ETag check and reads afresh (see ``handlers.transitions.commit_transition``).

Both are views of one ``ChatMemory``: a least-recently-used map bounded in bytes
(``WORKER_CACHE_MB``), shared by every table store of the process, so that memory follows the
budget, not the number of chats or tables. Sizes are estimated from the text an entry holds
(``sys.getsizeof`` of its strings, which is what they cost, plus a measured overhead per
object). An entry larger than an eighth of the budget is not kept at all: one very long chat
(or one very large message) must not flush every other chat out.
"""

import sys
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.runs.model import Run
from worker.store.layout import ChatMessage, ChatState

MIB = 1024 * 1024
# WORKER_CACHE_MB's default (SPEC §3).
DEFAULT_CACHE_MB = 64
# An entry may take at most this share of the budget (1/8); a larger one is not kept.
LARGEST_ENTRY_SHARE = 8

# What objects cost beyond the text they hold, measured with tracemalloc on CPython 3.11
# (``tests/test_store_cache.py`` keeps the estimates near the truth): a ChatMessage read from
# a row (the instance, its datetime, its list slot);
MESSAGE_OVERHEAD = 200
# one entry of the map (its key tuple and chat id, the entry record, the list, the map's node);
ENTRY_OVERHEAD = 450
# the parts of a committed state or run: an instance with its attribute dict, per field; a
# dict, per item; a list or tuple, per item; a date; a number.
INSTANCE_BYTES, FIELD_BYTES = 64, 12
DICT_BYTES, ITEM_BYTES = 64, 30
SEQUENCE_BYTES, SLOT_BYTES = 56, 8
SCALAR_BYTES = 32

# The kinds of entry, part of each key.
_HISTORY = "history"
_COMMITTED = "committed"

Key = tuple[str, str, str]  # (scope: the store's table, kind, chat id)


@dataclass
class _Entry:
    value: Any
    size: int


class ChatMemory:
    """One least-recently-used map of everything the process remembers of chats, bounded in
    (estimated) bytes: putting an entry evicts the least recently used ones until it fits.

    Plain state on the event loop (no locks): every caller runs on the worker's one loop.
    """

    def __init__(self, budget_bytes: int = DEFAULT_CACHE_MB * MIB) -> None:
        self.budget = max(0, budget_bytes)
        self.largest_entry = self.budget // LARGEST_ENTRY_SHARE
        self.used = 0
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def entry(self, key: Key) -> _Entry | None:
        """The entry of ``key``, now the most recently used, or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Key, value: Any, size: int) -> bool:
        """Keep ``value`` (about ``size`` bytes) under ``key``, replacing what was there;
        False (and nothing kept under ``key``) when it is larger than an entry may be."""
        self.pop(key)
        size += ENTRY_OVERHEAD
        if size > self.largest_entry:
            return False
        self._entries[key] = _Entry(value, size)
        self.used += size
        while self.used > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.used -= evicted.size
        return True

    def pop(self, key: Key) -> Any:
        """Forget ``key``; its value, or None."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.used -= entry.size
        return entry.value


def text_bytes(text: str | None) -> int:
    """What a string costs (0 for None and the empty string, which are shared)."""
    return sys.getsizeof(text) if text else 0


def message_bytes(message: ChatMessage) -> int:
    """The estimated size of a cached message."""
    return (
        MESSAGE_OVERHEAD
        + text_bytes(message.content)
        + text_bytes(message.tool_calls)
        + text_bytes(message.name)
        + text_bytes(message.run_id)
    )


def value_bytes(value: Any, depth: int = 0) -> int:
    """The estimated size of a value made of dataclasses, dicts, sequences, strings and
    scalars (a state, a run, their parameters). Deeper than a few levels it counts a flat
    size: run parameters are JSON of a known shape, not arbitrary graphs. (Called on every
    commit: a few dozen objects, tens of microseconds.)"""
    kind = type(value)
    if kind is str:
        return text_bytes(value)
    if value is None or kind is bool:
        return 0  # shared objects
    if kind is int:
        return 0 if -5 <= value < 257 else SCALAR_BYTES  # small ints are shared
    if depth > 6:
        return SCALAR_BYTES
    if kind is dict:
        return DICT_BYTES + sum(
            ITEM_BYTES + value_bytes(k, depth + 1) + value_bytes(v, depth + 1)
            for k, v in value.items()
        )
    if kind is list or kind is tuple:
        return SEQUENCE_BYTES + sum(SLOT_BYTES + value_bytes(item, depth + 1) for item in value)
    if hasattr(kind, "__dataclass_fields__") and hasattr(value, "__dict__"):
        attributes = vars(value)
        return (
            INSTANCE_BYTES
            + FIELD_BYTES * len(attributes)
            + sum(value_bytes(item, depth + 1) for item in attributes.values())
        )
    if isinstance(value, str):
        return text_bytes(value)
    return SCALAR_BYTES


@dataclass
class _History:
    created_at: datetime
    messages: list[ChatMessage]


class HistoryCache:
    """A contiguous prefix of each recently used chat's messages (one table's view of the
    process's ``ChatMemory``)."""

    def __init__(self, memory: ChatMemory, scope: str) -> None:
        self._memory = memory
        self._scope = scope

    def _key(self, chat_id: str) -> Key:
        return (self._scope, _HISTORY, chat_id)

    def get(self, chat_id: str, created_at: datetime | None) -> list[ChatMessage]:
        """The cached messages ``1..k`` of the chat created at ``created_at`` (maybe none)."""
        entry = self._memory.entry(self._key(chat_id))
        if entry is None or created_at is None:
            return []
        history: _History = entry.value
        return history.messages if history.created_at == created_at else []

    def put(self, chat_id: str, created_at: datetime | None, messages: list[ChatMessage]) -> None:
        """Remember ``messages`` (``1..k``, in order) as the chat's prefix."""
        self.forget(chat_id)
        if created_at is None or not messages:
            return
        size = sum(message_bytes(message) for message in messages)
        self._memory.put(self._key(chat_id), _History(created_at, list(messages)), size)

    def extend(
        self, chat_id: str, created_at: datetime | None, messages: list[ChatMessage]
    ) -> None:
        """Append messages just committed, if they follow the cached prefix directly."""
        key = self._key(chat_id)
        entry = self._memory.entry(key)
        if entry is None or created_at is None or not messages:
            return
        history: _History = entry.value
        if history.created_at != created_at or messages[0].index != len(history.messages) + 1:
            return
        # A new list (a caller may hold the old one); the size grows by the new messages only.
        grown = _History(created_at, [*history.messages, *messages])
        size = entry.size - ENTRY_OVERHEAD + sum(message_bytes(message) for message in messages)
        self._memory.put(key, grown, size)

    def has(self, chat_id: str) -> bool:
        return self._key(chat_id) in self._memory

    def forget(self, chat_id: str) -> None:
        self._memory.pop(self._key(chat_id))


@dataclass(frozen=True)
class Committed:
    """The rows of one run as a commit left them: ``claims`` are the ETags of the claim rows
    it created (row key -> ETag), held by the worker that made the commit."""

    state: ChatState
    run: Run
    claims: dict[str, str]


_Rows = tuple[ChatState, dict[str, Run], dict[str, str]]


class CommittedCache:
    """The state and runs of each chat as this process last committed them (one table's view
    of the process's ``ChatMemory``)."""

    def __init__(self, memory: ChatMemory, scope: str) -> None:
        self._memory = memory
        self._scope = scope

    def _key(self, chat_id: str) -> Key:
        return (self._scope, _COMMITTED, chat_id)

    def put(self, state: ChatState, runs: dict[str, Run], claims: dict[str, str]) -> None:
        rows: _Rows = (state, runs, claims)
        self._memory.put(self._key(state.chat_id), rows, value_bytes(rows))

    def take(self, chat_id: str, run_id: str) -> Committed | None:
        """The state and the run ``run_id`` of the last commit, once (then forgotten)."""
        rows: _Rows | None = self._memory.pop(self._key(chat_id))
        if rows is None or run_id not in rows[1]:
            return None
        return Committed(rows[0], rows[1][run_id], rows[2])

    def peek(self, chat_id: str, run_id: str) -> Committed | None:
        """The same, left in place (for a reader that only acts on a run that waits)."""
        entry = self._memory.entry(self._key(chat_id))
        if entry is None:
            return None
        rows: _Rows = entry.value
        if run_id not in rows[1]:
            return None
        return Committed(rows[0], rows[1][run_id], rows[2])

    def forget(self, chat_id: str) -> None:
        self._memory.pop(self._key(chat_id))

"""What is sent to the model: repair, cap, trim and encode a chat's history (pure, no I/O).

The stored history is always the whole text (SPEC §5.2); only the copy sent to the model is
shaped here, in this order (see :func:`prepare_for_model`):

1. :func:`repair_tool_pairs` makes it valid for Chat Completions (every tool call answered
   right after its assistant message, no stray tool messages);
2. :func:`cap_tool_output` truncates huge tool outputs, with an explicit marker;
3. :func:`trim_history` drops the oldest messages to fit a token budget, never splitting an
   assistant tool-call message from its results and never dropping the leading system messages
   or the current user message; the budget is first reduced by what the request sends beside
   the history (:func:`request_overhead_tokens`: tool schemas, the run's instructions);
4. :func:`to_chat_messages` encodes the result as the ``messages`` array.
"""

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from worker.runs.model import ToolCallRef

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "DEFAULT_MAX_TOOL_OUTPUT_CHARS",
    "MISSING_TOOL_RESULT",
    "ModelMessage",
    "Role",
    "ToolCallRef",
    "cap_tool_output",
    "context_window",
    "estimate_tokens",
    "estimate_total",
    "prepare_for_model",
    "repair_tool_pairs",
    "request_overhead_tokens",
    "to_chat_messages",
    "token_budget",
    "trim_history",
]

Role = Literal["system", "user", "assistant", "tool"]
_ROLES = frozenset({"system", "user", "assistant", "tool"})

# The text of a tool message inserted for a call that has no recorded result.
MISSING_TOOL_RESULT = "error: no result was recorded for this tool call"
DEFAULT_MAX_TOOL_OUTPUT_CHARS = 65536
DEFAULT_CONTEXT_WINDOW = 128000

# Per-message tokens the API adds around each message (role, separators), and the JSON
# scaffolding around one tool call ({"id":..,"type":"function","function":{"name":..,...}}).
_MESSAGE_OVERHEAD_TOKENS = 4
_TOOL_CALL_OVERHEAD_CHARS = 48


@dataclass(frozen=True)
class ModelMessage:
    """One message as the model sees it (not as it is stored)."""

    role: Role
    content: str
    tool_calls: tuple[ToolCallRef, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        # Roles come from stored rows; a typo there must not become a malformed request.
        if self.role not in _ROLES:
            raise ValueError(f"unknown message role {self.role!r}")


# --- token estimates ---------------------------------------------------------------------------


def estimate_tokens(message: ModelMessage) -> int:
    """A cheap upper-leaning estimate: UTF-8 bytes / 4 of the text, plus a per-message overhead.

    Bytes rather than characters: for English text both are the same, and for scripts where one
    character is a token or more (Chinese, Japanese) counting characters would under-count by 3x
    or more, which is the side that ends in a context-length error.
    """
    size = _utf8_len(message.content)
    for call in message.tool_calls:
        size += (
            _utf8_len(call.id)
            + _utf8_len(call.name)
            + _utf8_len(call.arguments)
            + _TOOL_CALL_OVERHEAD_CHARS
        )
    if message.tool_call_id is not None:
        size += _utf8_len(message.tool_call_id)
    return math.ceil(size / 4) + _MESSAGE_OVERHEAD_TOKENS


def estimate_total(messages: Iterable[ModelMessage]) -> int:
    """The estimate of a whole message list."""
    return sum(estimate_tokens(message) for message in messages)


def request_overhead_tokens(
    tools: Sequence[Mapping[str, Any]] = (), instructions: str | None = None
) -> int:
    """The estimate of what a request sends beside the history: the tool schemas (as the
    JSON they are sent as) and the run's extra instructions (a system message or the
    ``instructions`` field), on the same bytes / 4 scale as :func:`estimate_tokens`."""
    tokens = 0
    if tools:
        schemas = json.dumps(list(tools), separators=(",", ":"), ensure_ascii=False, default=str)
        tokens += math.ceil(_utf8_len(schemas) / 4)
    if instructions:
        tokens += estimate_tokens(ModelMessage("system", instructions))
    return tokens


def _utf8_len(text: str) -> int:
    # errors="surrogatepass": a lone surrogate from a bad client must not crash the estimate.
    return len(text.encode("utf-8", errors="surrogatepass"))


# --- context windows ---------------------------------------------------------------------------

# Model families by name prefix; the longest matching prefix wins, so "gpt-4o" beats "gpt-4".
_CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-5": 400000,
    "gpt-4.1": 1047576,
    "gpt-41": 1047576,  # Azure deployment names often drop the dot
    "gpt-4.5": 128000,
    "gpt-4o": 128000,
    "gpt4o": 128000,
    "gpt-4-turbo": 128000,
    "gpt-4-1106": 128000,
    "gpt-4-0125": 128000,
    "gpt-4-32k": 32768,
    "gpt-4": 8192,
    "gpt-35-turbo": 16385,
    "gpt-3.5-turbo": 16385,
    "o1-mini": 128000,
    "o1-preview": 128000,
    "o1": 200000,
    "o3": 200000,
    "o4": 200000,
}
_FAMILIES = sorted(_CONTEXT_WINDOWS, key=len, reverse=True)
# A family name at the start of the model name or after a separator: "gpt-4o-mini",
# "prod-gpt-4o-mini", "team_o3-mini"; but not "gpt-4o-1" read as "o1".
_FAMILY_PATTERN = re.compile(
    r"(?:^|[^a-z0-9])(" + "|".join(re.escape(family) for family in _FAMILIES) + ")"
)


def context_window(model: str) -> int:
    """The context window (tokens) of a model or Azure deployment name, best effort.

    Matched case-insensitively by family prefix, also after a separator inside a deployment name
    ("prod-gpt-4o"); unknown names get ``DEFAULT_CONTEXT_WINDOW`` (128000).
    """
    name = model.strip().lower()
    # Regex alternation tries the families longest first, so the first hit is the most specific.
    matches = [m.group(1) for m in _FAMILY_PATTERN.finditer(name)]
    if not matches:
        return DEFAULT_CONTEXT_WINDOW
    return _CONTEXT_WINDOWS[max(matches, key=len)]


def token_budget(model: str, fraction: float = 0.75) -> int:
    """The history budget for ``model``: ``fraction`` of its context window (SPEC default 75%)."""
    return int(context_window(model) * fraction)


# --- repair, cap, trim -------------------------------------------------------------------------


def repair_tool_pairs(messages: Sequence[ModelMessage]) -> list[ModelMessage]:
    """A history valid for Chat Completions: every tool call answered right after its message.

    For each assistant message with tool calls, the recorded answers (the first tool message
    with the call's id after it) follow it directly, in their original order, and then one
    ``MISSING_TOOL_RESULT`` tool message for each call that has none (a chat written by the
    Functions extension, a run stopped at its tool-round cap). Tool messages that answer no
    call, or a call already answered, are dropped. Returns a new list; the input is untouched.
    """
    # Where each call id is answered, in order; an answer is used by one call at most.
    answers_by_id: dict[str, list[int]] = {}
    for index, message in enumerate(messages):
        if message.role == "tool" and message.tool_call_id is not None:
            answers_by_id.setdefault(message.tool_call_id, []).append(index)

    used: set[int] = set()
    answers: dict[int, list[int]] = {}  # assistant message index -> its answers' indices
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        for call_id in dict.fromkeys(call.id for call in message.tool_calls):
            later = next(
                (i for i in answers_by_id.get(call_id, ()) if i > index and i not in used), None
            )
            if later is not None:
                used.add(later)
                answers.setdefault(index, []).append(later)

    repaired: list[ModelMessage] = []
    for index, message in enumerate(messages):
        if message.role == "tool":
            continue  # emitted with its assistant message below, or dropped
        repaired.append(message)
        if message.role != "assistant" or not message.tool_calls:
            continue
        found = sorted(answers.get(index, ()))
        repaired.extend(messages[i] for i in found)
        answered = {messages[i].tool_call_id for i in found}
        for call_id in dict.fromkeys(call.id for call in message.tool_calls):
            if call_id not in answered:
                repaired.append(ModelMessage("tool", MISSING_TOOL_RESULT, tool_call_id=call_id))
    return repaired


def cap_tool_output(text: str, max_chars: int = DEFAULT_MAX_TOOL_OUTPUT_CHARS) -> str:
    """``text`` unchanged if it fits, else its first ``max_chars`` characters and a marker.

    The marker says it is a cut and how much was shown, so neither the model nor a person
    reading the request mistakes it for the whole output.
    """
    if len(text) <= max_chars:
        return text
    marker = (
        f"\n\n[truncated by assistant-worker: showing {max_chars:,} of {len(text):,} characters]"
    )
    return text[:max_chars] + marker


def trim_history(messages: Sequence[ModelMessage], budget_tokens: int) -> list[ModelMessage]:
    """Drop the oldest groups of messages until the estimate fits ``budget_tokens``.

    The leading system messages are always kept. The rest is cut into groups, each starting at
    a non-tool message and holding the tool messages after it, so an assistant tool-call
    message is never separated from its results. Two groups are always kept, even if they
    alone exceed the budget (the caller caps tool outputs to keep that reasonable): the
    current user message (the last user message), without which the model would answer a
    question nobody asked now, and the newest group. Groups before the user message go
    first, oldest first; if that is not enough, the current turn's older tool rounds (between
    the user message and the newest group), oldest first. Expects a repaired history
    (:func:`repair_tool_pairs`). Returns a new list; the input is untouched.
    """
    head = 0
    while head < len(messages) and messages[head].role == "system":
        head += 1
    system = list(messages[:head])

    groups: list[list[ModelMessage]] = []
    for message in messages[head:]:
        if message.role != "tool" or not groups:
            groups.append([message])
        else:
            groups[-1].append(message)

    newest = len(groups) - 1
    current = next(
        (index for index in range(newest, -1, -1) if groups[index][0].role == "user"), newest
    )
    keep = [True] * len(groups)
    total = estimate_total(system) + sum(estimate_total(group) for group in groups)
    # Older turns first, then the current turn's earlier rounds; each oldest first.
    for index in [*range(current), *range(current + 1, newest)]:
        if total <= budget_tokens:
            break
        total -= estimate_total(groups[index])
        keep[index] = False
    return system + [m for index, group in enumerate(groups) if keep[index] for m in group]


def prepare_for_model(
    messages: Sequence[ModelMessage],
    budget_tokens: int,
    *,
    tools: Sequence[Mapping[str, Any]] = (),
    instructions: str | None = None,
    max_tool_output_chars: int = DEFAULT_MAX_TOOL_OUTPUT_CHARS,
) -> list[ModelMessage]:
    """Repair, cap tool outputs, then trim: the history to send, in the order that is safe.

    Capping comes before trimming so the estimate is of what is actually sent. ``tools`` (the
    request's function definitions) and ``instructions`` (the run's extra instructions) are
    sent too: the history gets the budget they leave.
    """
    capped = [
        replace(message, content=cap_tool_output(message.content, max_tool_output_chars))
        if message.role == "tool"
        else message
        for message in repair_tool_pairs(messages)
    ]
    room = budget_tokens - request_overhead_tokens(tools, instructions)
    return trim_history(capped, max(room, 0))


# --- encoding ----------------------------------------------------------------------------------


def to_chat_messages(messages: Iterable[ModelMessage]) -> list[dict[str, Any]]:
    """The Chat Completions ``messages`` array."""
    encoded: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            if message.tool_call_id is None:
                raise ValueError("a tool message needs a tool_call_id (repair the history first)")
            encoded.append(
                {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
            )
        elif message.role == "assistant" and message.tool_calls:
            encoded.append(
                {
                    "role": "assistant",
                    # null rather than "" next to tool calls: what the API itself returns, and
                    # some OpenAI-compatible servers reject an empty string there.
                    "content": message.content or None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                        for call in message.tool_calls
                    ],
                }
            )
        else:
            encoded.append({"role": message.role, "content": message.content})
    return encoded

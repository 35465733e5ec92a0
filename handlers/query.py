"""The extension's ``assistantQuery``: a chat's ``AssistantState``."""

from datetime import UTC, datetime
from typing import Literal

from schemas import ApprovalAudit, AssistantMessage, AssistantState, WaitingToolCall
from schemas.events import RunSummary
from worker.runs.model import Decision, PendingCall, Run
from worker.store.layout import ChatMessage
from worker.store.protocol import ChatStore

NEVER = datetime(1, 1, 1, tzinfo=UTC)
# The query lists the chat's newest runs only.
RECENT_RUNS = 20


def audit(decision: Decision | None) -> ApprovalAudit | None:
    """A decision as the query shows it: who, approve or deny, why, when."""
    if decision is None:
        return None
    return ApprovalAudit(
        approved=decision.approve, by=decision.by, reason=decision.reason, decided_at=decision.at
    )


def to_assistant_message(message: ChatMessage) -> AssistantMessage:
    """A stored message in the extension's ``AssistantMessage`` shape (plus extras)."""
    return AssistantMessage(
        content=message.content,
        role=message.role,
        tool_calls=message.tool_calls,
        index=message.index,
        created_at=message.created_at,
        tool_call_id=message.name if message.role == "Tool" else None,
        run_id=message.run_id,
        approval=audit(message.decision),
    )


def waiting_calls(run: Run) -> list[WaitingToolCall]:
    """What a run in requires_action waits for, call by call: a decision, an external
    output, or (approved) its turn to run once nothing else waits."""
    if run.finished or run.status != "requires_action":
        return []

    def waits_for(call: PendingCall) -> Literal["approval", "output", "run"]:
        if call.undecided:
            return "approval"
        return "output" if call.external else "run"

    return [
        WaitingToolCall(
            id=call.id,
            name=call.name,
            arguments=call.arguments,
            waits_for=waits_for(call),
            server=call.server,
            approval=audit(call.decision),
        )
        for call in run.pending_calls
    ]


async def get_state(
    store: ChatStore, chat_id: str, since: datetime | None = None
) -> AssistantState:
    """The chat's state and its messages created after ``since`` (all when None).

    A chat that does not exist gives ``exists: false`` with zero counts, as the extension does.
    """
    state = await store.load_state(chat_id)
    if state is None:
        # The extension answers with default (year 1) timestamps for a missing chat.
        return AssistantState(id=chat_id, exists=False, created_at=NEVER, last_updated_at=NEVER)
    messages = await store.read_messages(chat_id, state.total_messages)
    if since is not None:
        messages = [message for message in messages if message.created_at > since]
    return AssistantState(
        id=chat_id,
        exists=state.exists,
        created_at=state.created_at,
        last_updated_at=state.last_updated_at,
        total_messages=state.total_messages,
        total_tokens=state.total_tokens,
        recent_messages=[to_assistant_message(message) for message in messages],
        runs=[
            RunSummary(
                run_id=run.run_id,
                status=run.status,
                created_at=run.created_at,
                usage=run.usage.to_json(),
                error=run.error,
                waiting_tool_calls=waiting_calls(run),
            )
            for run in (await store.runs(chat_id))[-RECENT_RUNS:]
        ],
    )

"""The message contract of assistant-worker.

Pydantic models for every request, event and dead-letter envelope, the body decoding that
accepts plain JSON and Base64 JSON, and the JSON Schema export that producers in other
languages use. This package imports nothing from ``worker`` or ``handlers``, nor any Azure or
OpenAI SDK, so that a producer can vendor it.
"""

from schemas.decode import InvalidMessage, decode_body, encode_body, parse_message
from schemas.events import (
    ApprovalAudit,
    ApprovalCall,
    AssistantDelta,
    AssistantMessage,
    AssistantReply,
    AssistantState,
    DeadLetterEnvelope,
    DeadLetterInfo,
    DeltaToolCall,
    ToolApprovalRequired,
    ToolCallRequest,
    ToolCallsRequired,
    WaitingToolCall,
)
from schemas.requests import (
    DEFAULT_COLLECTION,
    DEFAULT_INSTRUCTIONS,
    DEFAULT_STORAGE_SETTING,
    AssistantCreate,
    AssistantDelete,
    AssistantPost,
    ChatRequest,
    Message,
    RunDeadline,
    RunStep,
    SubmitToolApprovals,
    SubmitToolOutputs,
    ToolApproval,
    ToolOutput,
)

__all__ = [
    "DEFAULT_COLLECTION",
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_STORAGE_SETTING",
    "ApprovalAudit",
    "ApprovalCall",
    "AssistantCreate",
    "AssistantDelete",
    "AssistantDelta",
    "AssistantMessage",
    "AssistantPost",
    "AssistantReply",
    "AssistantState",
    "ChatRequest",
    "DeadLetterEnvelope",
    "DeadLetterInfo",
    "DeltaToolCall",
    "InvalidMessage",
    "Message",
    "RunDeadline",
    "RunStep",
    "SubmitToolApprovals",
    "SubmitToolOutputs",
    "ToolApproval",
    "ToolApprovalRequired",
    "ToolCallRequest",
    "ToolCallsRequired",
    "ToolOutput",
    "WaitingToolCall",
    "decode_body",
    "encode_body",
    "parse_message",
]

"""Requests: what producers put on ``assistant-requests``, and the worker on ``assistant-runs``
and ``assistant-deadlines``.

Field names on the wire are camelCase, as in the Azure Functions OpenAI extension, so that the
extension's ``assistantCreate`` / ``assistantPost`` payloads validate unchanged.
"""

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from schemas.base import WireModel
from schemas.names import AssistantId, QueueName, RequestId, SettingName, TableName

DEFAULT_INSTRUCTIONS = "You are a helpful assistant."
DEFAULT_STORAGE_SETTING = "AzureWebJobsStorage"
DEFAULT_COLLECTION = "ChatState"

ModelApi = Literal["chat", "responses", "assistants"]
ReasoningEffort = Literal["minimal", "low", "medium", "high"]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
MaxTokens = Annotated[int, Field(gt=0)]
# W3C trace context header value (version-traceid-parentid-flags); checked loosely, a bad one
# starts a new trace instead of failing the request.
TraceParent = Annotated[str, Field(max_length=256)]


class ChatRequest(WireModel):
    """Fields every request names its chat with."""

    id: AssistantId
    request_id: RequestId | None = None
    chat_storage_connection_setting: SettingName = DEFAULT_STORAGE_SETTING
    collection_name: TableName = DEFAULT_COLLECTION
    # The producer's W3C trace context; the run's steps and replies continue its trace.
    traceparent: TraceParent | None = None


class FunctionDefinition(WireModel):
    """The function of an external tool, as in the OpenAI tools array."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class FunctionTool(WireModel):
    """A tool whose outputs a producer submits with ``submitToolOutputs``."""

    type: Literal["function"]
    function: FunctionDefinition


class CodeInterpreterTool(WireModel):
    """The hosted code interpreter (``responses`` and ``assistants`` backends)."""

    type: Literal["code_interpreter"]
    file_ids: list[str] | None = None


class FileSearchTool(WireModel):
    """The hosted file search (``responses`` and ``assistants`` backends)."""

    type: Literal["file_search"]
    vector_store_ids: list[str] | None = None


ToolSpec = Annotated[
    FunctionTool | CodeInterpreterTool | FileSearchTool, Field(discriminator="type")
]
# A registered tool by name, or a full definition.
ToolEntry = Annotated[str, Field(min_length=1, max_length=64)] | ToolSpec
# A tool as the model sees it: a registered or external tool's name, or an MCP server's tool
# as ``{server}__{tool}``.
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
# Most tool names one assistant may list as needing approval.
MAX_APPROVAL_NAMES = 256


# An MCP server of WORKER_MCP_SERVERS, by name, and one of its tools, by its name there.
McpServerName = Annotated[str, Field(min_length=1, max_length=64)]
McpToolName = Annotated[str, Field(min_length=1, max_length=128)]


class McpServerRef(WireModel):
    """An MCP server an assistant uses, and which of its tools (every one when absent)."""

    name: McpServerName
    allowed_tools: Annotated[list[McpToolName], Field(max_length=256)] | None = None


McpServerEntry = McpServerName | McpServerRef


class AssistantCreate(ChatRequest):
    """Create (or reset) an assistant: the extension's ``assistantCreate``."""

    type: Literal["assistantCreate"] = "assistantCreate"
    instructions: str = DEFAULT_INSTRUCTIONS
    chat_model: str | None = None
    api: ModelApi | None = None
    tools: list[ToolEntry] | None = None
    # Names from WORKER_MCP_SERVERS: their tools are offered as {server}__{tool} (SPEC §5.5).
    mcp_servers: Annotated[list[McpServerEntry], Field(max_length=32)] | None = None
    # Tools whose calls wait for a person's decision (submitToolApprovals), or "all".
    approval_required: (
        Annotated[list[ToolName], Field(max_length=MAX_APPROVAL_NAMES)] | Literal["all"] | None
    ) = None
    # Stream the model's output of this assistant's runs (SPEC §5.4), unless a post says not.
    stream: bool | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    reasoning_effort: ReasoningEffort | None = None

    @field_validator("instructions", mode="before")
    @classmethod
    def _default_when_blank(cls, value: object) -> object:
        # The extension sends null or "" when the function had no instructions.
        if value is None or (isinstance(value, str) and not value.strip()):
            return DEFAULT_INSTRUCTIONS
        return value


class AssistantPost(ChatRequest):
    """Post a user message and run a turn: the extension's ``assistantPost``."""

    type: Literal["assistantPost"] = "assistantPost"
    user_message: Annotated[str, Field(min_length=1)]
    chat_model: str | None = None
    ai_connection_name: SettingName | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    is_reasoning_model: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    tool_choice: str | dict[str, Any] | None = None
    instructions: str | None = None
    reply_to: QueueName | None = None
    # Stream this run's output as assistantDelta events (default: the assistant's `stream`).
    stream: bool | None = None
    # This turn on another model API; the history is the table's, so a chat moves between
    # APIs (off the legacy assistants) without losing a message.
    api: ModelApi | None = None


class ToolOutput(WireModel):
    """The output of one external tool call."""

    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)]
    output: str


class SubmitToolOutputs(ChatRequest):
    """Resume a run that waits in ``requires_action`` for external tool outputs."""

    type: Literal["submitToolOutputs"] = "submitToolOutputs"
    run_id: Annotated[str, Field(min_length=1, max_length=128)]
    tool_outputs: Annotated[list[ToolOutput], Field(min_length=1)]


# Who decided (a person's name or address, a service), as kept for audit.
MAX_BY_LENGTH = 256
# A decision's reason (what the model reads after "denied: ").
MAX_REASON_LENGTH = 4000
# Most decisions one request may carry.
MAX_APPROVALS = 1000


class ToolApproval(WireModel):
    """A decision on one tool call that waits for approval."""

    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)]
    approve: bool
    reason: Annotated[str, Field(max_length=MAX_REASON_LENGTH)] | None = None
    by: Annotated[str, Field(max_length=MAX_BY_LENGTH)] | None = None


class SubmitToolApprovals(ChatRequest):
    """Decide tool calls a run waits for in ``requires_action`` (approve or deny each)."""

    type: Literal["submitToolApprovals"] = "submitToolApprovals"
    run_id: Annotated[str, Field(min_length=1, max_length=128)]
    approvals: Annotated[list[ToolApproval], Field(min_length=1, max_length=MAX_APPROVALS)]


class AssistantDelete(ChatRequest):
    """Remove a chat's rows and cancel its runs."""

    type: Literal["assistantDelete"] = "assistantDelete"


class RunStep(WireModel):
    """A continuation of a run, written by the worker on ``assistant-runs`` only."""

    type: Literal["runStep"] = "runStep"
    id: AssistantId
    run_id: Annotated[str, Field(min_length=1, max_length=128)]
    step: Annotated[int, Field(ge=0)]
    collection_name: TableName = DEFAULT_COLLECTION
    chat_storage_connection_setting: SettingName = DEFAULT_STORAGE_SETTING
    # The requestId of the post that started the run (for the logs of every step).
    request_id: RequestId | None = None
    traceparent: TraceParent | None = None


class RunDeadline(WireModel):
    """The watchdog of a run, written by the worker on ``assistant-deadlines`` when the run
    starts and due at its deadline: whatever happened to its steps, a run still active then ends
    ``expired`` and its chat's next queued post starts."""

    type: Literal["runDeadline"] = "runDeadline"
    id: AssistantId
    run_id: Annotated[str, Field(min_length=1, max_length=128)]
    collection_name: TableName = DEFAULT_COLLECTION
    chat_storage_connection_setting: SettingName = DEFAULT_STORAGE_SETTING
    # The requestId of the post that started the run (for the logs of every step).
    request_id: RequestId | None = None
    traceparent: TraceParent | None = None


Message = (
    AssistantCreate
    | AssistantPost
    | SubmitToolOutputs
    | SubmitToolApprovals
    | AssistantDelete
    | RunStep
    | RunDeadline
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    "assistantCreate": AssistantCreate,
    "assistantPost": AssistantPost,
    "submitToolOutputs": SubmitToolOutputs,
    "submitToolApprovals": SubmitToolApprovals,
    "assistantDelete": AssistantDelete,
    "runStep": RunStep,
    "runDeadline": RunDeadline,
}

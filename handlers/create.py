"""``assistantCreate``: create an assistant, or reset it (the extension's semantics)."""

from typing import Any

from handlers.replies import end_removed_runs
from handlers.services import RunServices
from schemas import AssistantCreate
from schemas.bounded import listing
from schemas.requests import FunctionTool
from worker.loop.errors import PermanentError
from worker.loop.handling import HandlerResult, MessageContext
from worker.runs.approvals import SEPARATOR
from worker.store.layout import AppliedRequest, ChatMessage, ChatState


def assistant_defaults(request: AssistantCreate) -> dict[str, Any]:
    """The model, API, tools and sampling fields that become the assistant's defaults."""
    fields = request.model_dump(
        mode="json",
        by_alias=True,
        exclude_none=True,
        include={
            "chat_model",
            "api",
            "tools",
            "mcp_servers",
            "approval_required",
            "stream",
            "temperature",
            "top_p",
            "max_tokens",
            "reasoning_effort",
        },
    )
    return dict(fields)


def check_tools(request: AssistantCreate, services: RunServices) -> None:
    """Tools named must be registered here, and hosted tools need an API that has them."""
    registered = set(services.tools.names())
    unknown = [t for t in request.tools or [] if isinstance(t, str) and t not in registered]
    if unknown:
        # Both lists are cut ("'a', 'b' and 11998 more"): a create may name thousands.
        known = listing(sorted(registered), shown=20) or "none (set WORKER_TOOLS)"
        raise PermanentError(
            f"unknown tool(s) {listing(unknown)}; registered tools: {known}",
            error_type="UnknownTool",
        )
    api = request.api or services.settings.model_api
    hosted = [
        t.type for t in request.tools or [] if not isinstance(t, str) and t.type != "function"
    ]
    if hosted and api == "chat":
        raise PermanentError(
            f"hosted tools ({', '.join(sorted(set(hosted)))}) need api 'responses' or "
            "'assistants'; the 'chat' API has no hosted tools",
            error_type="HostedToolsNotSupported",
        )


def check_mcp_servers(request: AssistantCreate, services: RunServices) -> None:
    """MCP servers are named only from the operator's allow-list (never a URL from a message),
    each once."""
    names = [e if isinstance(e, str) else e.name for e in request.mcp_servers or []]
    allowed = services.settings.mcp_servers
    unknown = [name for name in names if name not in allowed]
    if unknown:
        listed = ", ".join(sorted(allowed)) or "none"
        raise PermanentError(
            f"MCP server(s) {', '.join(map(repr, unknown))} not allowed: list them in "
            f"WORKER_MCP_SERVERS (allowed: {listed})",
            error_type="McpServerNotAllowed",
        )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PermanentError(
            f"MCP server(s) {', '.join(map(repr, twice))} named more than once in mcpServers",
            error_type="McpServerNotAllowed",
        )


def check_approvals(request: AssistantCreate, services: RunServices) -> None:
    """``approvalRequired`` names tools the assistant can call: registered ones, its external
    tools, or ``server__tool`` tools of MCP servers; a name that is none of them (a typo) would
    never match a call, and the tool would run without approval."""
    required = request.approval_required
    if not isinstance(required, list):
        return
    known = set(services.tools.names())
    known.update(t.function.name for t in request.tools or [] if isinstance(t, FunctionTool))
    unknown = [name for name in required if name not in known and SEPARATOR not in name]
    if unknown:
        hint = ' (for every tool, send "approvalRequired": "all")' if "all" in unknown else ""
        raise PermanentError(
            f"approvalRequired names unknown tool(s) {', '.join(map(repr, unknown))}: name "
            "registered tools, external tools of this assistant, or MCP tools as "
            f"server__tool{hint}",
            error_type="UnknownTool",
        )


class CreateHandler:
    """Writes the ``state`` row and the system message; a redelivery with the same
    ``requestId`` finds its applied record and does not reset the chat again."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    async def __call__(self, request: AssistantCreate, context: MessageContext) -> HandlerResult:
        check_tools(request, self._services)
        check_mcp_servers(request, self._services)
        check_approvals(request, self._services)
        store = await self._services.stores.get(
            request.chat_storage_connection_setting, request.collection_name, create=True
        )
        now = self._services.clock()
        state = ChatState(
            chat_id=request.id,
            exists=True,
            created_at=now,
            last_updated_at=now,
            total_messages=1,
            total_tokens=0,
            defaults=assistant_defaults(request),
        )
        system = ChatMessage(index=1, role="System", content=request.instructions, created_at=now)
        applied = AppliedRequest(context.request_id, request.type, context.message_id, now)
        removed = await store.reset_chat(state, system, applied)
        if removed is None:
            return HandlerResult(note="duplicate")
        # A reset ends the chat's runs: the producers waiting on them are told.
        replies = await end_removed_runs(
            self._services, request.id, removed.runs, "the assistant was reset"
        )
        return HandlerResult(note="created", effects=replies)

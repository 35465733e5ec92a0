"""The ``responses`` backend: the Responses API in background mode (SPEC §5.1).

``begin`` creates a background response (``background=True, store=True``) and returns
``Pending({"responseId": id})``; ``poll`` retrieves it until it leaves ``queued``/``in_progress``.
A completed response's ``function_call`` items become tool calls; after the worker ran them,
``begin`` answers every call with ``function_call_output`` items in a follow-up response chained
by ``previous_response_id``. Without a usable previous response (a new run, a response the
service no longer has) the whole history is sent as input items instead.

Every background response carries ``metadata`` naming its chat, table, storage setting and run
(``response_metadata``): the provider's webhook names only the response, and the worker finds the
run from that metadata (``locate``: remembered from the create by the process that made it, else
read back from the API).

Reasoning state (reasoning models): every create asks for ``reasoning.encrypted_content``. The
reasoning items of a turn that called tools are kept in the run's handle; a chained follow-up
needs none of them (``previous_response_id`` carries them), but when the chain is broken (the
previous response is gone, or the outputs cannot be chained to it) the whole history is sent,
and each of this run's tool rounds gets its reasoning items back, just before its calls, so
that the model keeps its chain of thought across the tool round.

Streaming (``TurnRequest.stream``): the background response is created with ``stream=True`` and
the worker keeps its event stream while it holds the run, passing the text on with each event's
``sequence_number``; ``response.created`` tells the stream the response exists (the step
handler stores its id, so a worker that takes the run over after a crash follows it instead of
starting again). When the stream breaks, the call falls back to polling (``Pending``). A poll
whose stream has a resume position (``resume_after``) resumes the event stream with
``retrieve(id, stream=True, starting_after=N)`` instead.

Handle keys: ``responseId`` (the newest response of the run), ``callIds`` (the call ids that
response asked for, so a follow-up is only chained to the response its outputs answer) and
``reasoning`` (this run's rounds: ``{"callIds": [...], "items": [...]}``).
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from worker.backends.base import ModelError, TextStream, TurnRequest
from worker.backends.clients import ModelClients, ModelNotConfigured
from worker.backends.errors import classify
from worker.runs.history import ModelMessage
from worker.runs.model import ModelTurn, Pending, RunStatus, ToolCallRef, Usage

if TYPE_CHECKING:
    import openai
    from openai import AsyncStream
    from openai.types.responses import Response, ResponseStreamEvent

RESPONSE_ID = "responseId"
CALL_IDS = "callIds"
REASONING = "reasoning"

# The metadata every background response carries (the wire names of a runStep), so that a
# webhook, which names only the response, leads to its run. OpenAI caps values at 512 chars;
# the worker's ids, table and setting names are shorter.
METADATA_KEYS = ("chatId", "collectionName", "chatStorageConnectionSetting", "runId")
# Asks the service for the reasoning items' encrypted content (kept for a broken chain).
ENCRYPTED_REASONING = "reasoning.encrypted_content"
# Bytes of reasoning items a run keeps (JSON) in its row: the newest rounds that fit.
MAX_REASONING_BYTES = 256 * 1024
# Responses this process created, remembered for the webhooks that name them.
REMEMBERED_RESPONSES = 50_000

_WORKING = frozenset({"queued", "in_progress"})
_ENDED: dict[str, RunStatus] = {
    "failed": "failed",
    "cancelled": "cancelled",
    "incomplete": "incomplete",
}


def model_client(clients: ModelClients, request: TurnRequest) -> openai.AsyncOpenAI:
    """The client of the request's connection; a missing one is the request's fault."""
    try:
        return clients.client(request.ai_connection)
    except ModelNotConfigured as error:
        raise ModelError(str(error), transient=False) from error


def hosted_ids(tool: dict[str, Any], camel: str, snake: str) -> list[str]:
    """A list of ids of a hosted tool, from the create request's camelCase key or the API's."""
    value = tool.get(camel, tool.get(snake))
    return [str(item) for item in value] if isinstance(value, list) else []


def response_tools(request: TurnRequest) -> list[dict[str, Any]]:
    """Function tools in the Responses shape, then the hosted tools."""
    tools: list[dict[str, Any]] = []
    for tool in request.tools:
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            continue
        converted: dict[str, Any] = {
            "type": "function",
            "name": function["name"],
            "parameters": function.get("parameters") or {"type": "object", "properties": {}},
            # The Responses API makes function tools strict by default, which rejects most
            # generated schemas; Chat Completions (where these come from) defaults to false.
            "strict": bool(function.get("strict", False)),
        }
        if function.get("description"):
            converted["description"] = function["description"]
        tools.append(converted)
    for hosted in request.hosted_tools:
        kind = hosted.get("type")
        if kind == "file_search":
            tools.append(
                {
                    "type": "file_search",
                    "vector_store_ids": hosted_ids(hosted, "vectorStoreIds", "vector_store_ids"),
                }
            )
        elif kind == "code_interpreter":
            container = hosted.get("container")
            if not container:
                container = {"type": "auto"}
                file_ids = hosted_ids(hosted, "fileIds", "file_ids")
                if file_ids:
                    container["file_ids"] = file_ids
            tools.append({"type": "code_interpreter", "container": container})
        else:
            tools.append(dict(hosted))
    return tools


def response_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """A Chat Completions ``tool_choice`` in the Responses shape."""
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and "name" in function:
            return {"type": "function", "name": function["name"]}
    return choice


def response_sampling(request: TurnRequest) -> dict[str, Any]:
    """The sampling fields a request set, with the Responses API's names."""
    arguments: dict[str, Any] = {}
    if request.temperature is not None and not request.is_reasoning_model:
        arguments["temperature"] = request.temperature
    if request.top_p is not None and not request.is_reasoning_model:
        arguments["top_p"] = request.top_p
    if request.max_tokens is not None:
        arguments["max_output_tokens"] = request.max_tokens
    if request.reasoning_effort is not None:
        arguments["reasoning"] = {"effort": request.reasoning_effort}
    return arguments


def response_metadata(request: TurnRequest) -> dict[str, str]:
    """Where the run of a background response lives (see ``METADATA_KEYS``)."""
    values = (request.chat_id, request.collection, request.storage_setting, request.run_id)
    return {key: value[:512] for key, value in zip(METADATA_KEYS, values, strict=True)}


def run_location(metadata: object) -> dict[str, str] | None:
    """The run named by a response's metadata, or None when the response is not the worker's
    (another application of the same project, or metadata cut short)."""
    if not isinstance(metadata, dict):
        return None
    found = {key: metadata.get(key) for key in METADATA_KEYS}
    if not all(isinstance(value, str) and value for value in found.values()):
        return None
    return {key: str(value) for key, value in found.items()}


class CreatedResponses:
    """The metadata of the background responses this process created, newest kept (bounded):
    a webhook that names one finds its run without asking the API."""

    def __init__(self, limit: int = REMEMBERED_RESPONSES) -> None:
        self._limit = limit
        self._entries: OrderedDict[str, dict[str, str]] = OrderedDict()

    def remember(self, response_id: str, metadata: dict[str, str]) -> None:
        self._entries[response_id] = metadata
        self._entries.move_to_end(response_id)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> dict[str, str] | None:
        return self._entries.get(response_id)

    def __len__(self) -> int:
        return len(self._entries)


def reasoning_rounds(handle: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's tool rounds with their reasoning items, as the handle keeps them."""
    rounds = handle.get(REASONING)
    if not isinstance(rounds, list):
        return []
    return [
        r
        for r in rounds
        if isinstance(r, dict)
        and isinstance(r.get(CALL_IDS), list)
        and isinstance(r.get("items"), list)
    ]


def _reasoning_item(item: Any) -> dict[str, Any]:
    """A reasoning output item as an input item: its id, summary and encrypted content."""
    value: dict[str, Any] = {
        "type": "reasoning",
        "id": item.id,
        "summary": [{"type": "summary_text", "text": part.text} for part in item.summary or []],
    }
    if getattr(item, "encrypted_content", None):
        value["encrypted_content"] = item.encrypted_content
    return value


def _kept(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest rounds whose items fit ``MAX_REASONING_BYTES``: a run row has room for a few
    rounds of encrypted reasoning, not for any number (an older round then loses it)."""
    kept: list[dict[str, Any]] = []
    size = 0
    for entry in reversed(rounds):
        size += len(json.dumps(entry))
        if size > MAX_REASONING_BYTES:
            break
        kept.append(entry)
    return list(reversed(kept))


def to_input_items(
    messages: tuple[ModelMessage, ...], reasoning: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """A (repaired) history as Responses input items; ``reasoning``: this run's tool rounds
    with their reasoning items, each put back just before the turn whose calls it led to."""
    by_call = {
        str(entry[CALL_IDS][0]): entry["items"] for entry in reasoning or [] if entry[CALL_IDS]
    }
    items: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            if message.tool_call_id is None:
                raise ModelError(
                    "a tool message has no tool call id (the history was not repaired)",
                    transient=False,
                )
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.tool_call_id,
                    "output": message.content,
                }
            )
            continue
        if message.tool_calls and message.tool_calls[0].id in by_call:
            items.extend(by_call[message.tool_calls[0].id])
        if message.content:
            items.append({"role": message.role, "content": message.content})
        items.extend(
            {
                "type": "function_call",
                "call_id": call.id,
                "name": call.name,
                "arguments": call.arguments or "{}",
            }
            for call in message.tool_calls
        )
    return items


def _output_items(tool_outputs: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    return [
        {"type": "function_call_output", "call_id": call_id, "output": output}
        for call_id, output in tool_outputs
    ]


def _chains_to(request: TurnRequest) -> str | None:
    """The response the tool outputs answer, when the handle names it and its calls match."""
    previous = request.handle.get(RESPONSE_ID)
    if not request.tool_outputs or not isinstance(previous, str) or not previous:
        return None
    asked = request.handle.get(CALL_IDS)
    if isinstance(asked, list) and set(asked) != {call_id for call_id, _ in request.tool_outputs}:
        return None
    return previous


def _is_missing_previous(error: openai.OpenAIError) -> bool:
    import openai

    if not isinstance(error, openai.BadRequestError | openai.NotFoundError):
        return False
    body = error.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    param = inner.get("param") if isinstance(inner, dict) else None
    return code == "previous_response_not_found" or param == "previous_response_id"


def _refuses_include(error: openai.OpenAIError) -> bool:
    """A service (or model) that does not take ``include=["reasoning.encrypted_content"]``."""
    import openai

    if not isinstance(error, openai.BadRequestError):
        return False
    body = error.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    return isinstance(inner, dict) and inner.get("param") == "include"


def outcome(response: Response, earlier: dict[str, Any] | None = None) -> ModelTurn | Pending:
    """What a response says now: still working, ended without an answer, or the model's turn.
    ``earlier``: the run's handle, whose reasoning rounds a turn that calls tools extends."""
    handle: dict[str, Any] = {RESPONSE_ID: response.id}
    status = response.status or "completed"  # servers without background mode leave it out
    if status in _WORKING:
        return Pending(handle)
    if status in _ENDED:
        return Pending(handle, ended=_ENDED[status], error=_why_ended(response, status))
    if status != "completed":
        return Pending(handle, ended="failed", error=f"the response has status {status!r}")
    texts: list[str] = []
    calls: list[ToolCallRef] = []
    reasoning: list[dict[str, Any]] = []
    for item in response.output:
        if item.type == "reasoning":
            reasoning.append(_reasoning_item(item))
        elif item.type == "function_call":
            calls.append(ToolCallRef(item.call_id, item.name, item.arguments or ""))
        elif item.type == "message":
            for part in item.content:
                if part.type == "output_text":
                    texts.append(part.text)
                elif part.type == "refusal":
                    texts.append(part.refusal)
    usage = response.usage
    handle[CALL_IDS] = [call.id for call in calls]
    if calls and reasoning:
        # Kept for a broken chain: this round's calls must get their reasoning back.
        rounds = [r for r in reasoning_rounds(earlier or {}) if r[CALL_IDS] != handle[CALL_IDS]]
        handle[REASONING] = _kept([*rounds, {CALL_IDS: handle[CALL_IDS], "items": reasoning}])
    return ModelTurn(
        content="".join(texts) if texts else None,
        tool_calls=tuple(calls),
        usage=Usage(usage.input_tokens, usage.output_tokens, usage.total_tokens)
        if usage
        else Usage(),
        handle=handle,
    )


async def follow(
    events: AsyncStream[ResponseStreamEvent],
    stream: TextStream,
    handle: dict[str, Any],
    *,
    earlier: dict[str, Any] | None = None,
    created: Callable[[str], None] | None = None,
) -> ModelTurn | Pending:
    """Read a response's event stream to its end: the text goes to ``stream`` as it comes,
    the final event's response is the outcome. A stream that breaks once the response exists
    leaves it to the polls (``Pending``)."""
    import openai

    try:
        try:
            async for event in events:
                if event.type == "response.created":
                    handle = {RESPONSE_ID: event.response.id}
                    if created is not None:
                        created(event.response.id)
                    await stream.started(dict(handle), event.sequence_number)
                elif event.type in ("response.output_text.delta", "response.refusal.delta"):
                    await stream.text(event.delta, event.sequence_number)
                elif event.type in ("response.completed", "response.failed", "response.incomplete"):
                    return outcome(event.response, earlier)
                elif event.type == "error":
                    break  # the stream failed, not necessarily the response: poll it
        finally:
            await events.close()
    except openai.OpenAIError as error:
        if not handle:
            raise classify(error) from error
    if not handle:
        raise ModelError("the model's stream ended before the response was created", transient=True)
    return Pending(handle)


def _why_ended(response: Response, status: str) -> str:
    if response.error is not None and response.error.message:
        return f"the response {status}: {response.error.message}"
    details = response.incomplete_details
    if details is not None and details.reason:
        return f"the response is {status}: {details.reason}"
    return f"the response ended {status}"


class ResponsesBackend:
    """Background responses, chained by ``previous_response_id`` across tool rounds."""

    name = "responses"

    def __init__(self, clients: ModelClients) -> None:
        self._clients = clients
        self.created = CreatedResponses()
        # Connections (None: the default) whose service refused ``include``: asked no more.
        self._no_include: set[str | None] = set()

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        import openai  # loaded with the first model call, not at start-up

        client = model_client(self._clients, request)
        metadata = response_metadata(request)
        arguments: dict[str, Any] = {
            "model": request.model,
            "background": True,
            # A background response that is not stored can be gone before it is polled.
            "store": True,
            "metadata": metadata,
            **response_sampling(request),
        }
        if request.ai_connection not in self._no_include:
            arguments["include"] = [ENCRYPTED_REASONING]
        if request.instructions:
            # Not carried over by previous_response_id: sent with every response of the run.
            arguments["instructions"] = request.instructions
        tools = response_tools(request)
        if tools:
            arguments["tools"] = tools
            if request.tool_choice is not None:
                arguments["tool_choice"] = response_tool_choice(request.tool_choice)
        previous = _chains_to(request)
        # The whole history, with this run's reasoning before the calls it led to (a broken
        # chain must not cost the model its chain of thought across the tool round).
        history: dict[str, Any] = {
            "input": to_input_items(request.messages, reasoning_rounds(request.handle))
        }
        try:
            if previous is not None:
                chained: dict[str, Any] = {
                    "previous_response_id": previous,
                    "input": _output_items(request.tool_outputs),
                }
                try:
                    return await self._create(client, request, arguments, chained, metadata)
                except openai.OpenAIError as error:
                    if not _is_missing_previous(error):
                        raise
                    # The service no longer has it: the whole history says the same.
            return await self._create(client, request, arguments, history, metadata)
        except openai.OpenAIError as error:
            raise classify(error) from error

    async def _create(
        self,
        client: openai.AsyncOpenAI,
        request: TurnRequest,
        arguments: dict[str, Any],
        body: dict[str, Any],
        metadata: dict[str, str],
    ) -> ModelTurn | Pending:
        """``responses.create``, streamed when the call streams; a service that refuses
        ``include`` is asked again without it (and never again with it: its models keep no
        encrypted reasoning to send back)."""
        import openai

        try:
            return await self._create_once(client, request, arguments, body, metadata)
        except openai.BadRequestError as error:
            if "include" not in arguments or not _refuses_include(error):
                raise
            self._no_include.add(request.ai_connection)
            plain = {key: value for key, value in arguments.items() if key != "include"}
            return await self._create_once(client, request, plain, body, metadata)

    async def _create_once(
        self,
        client: openai.AsyncOpenAI,
        request: TurnRequest,
        arguments: dict[str, Any],
        body: dict[str, Any],
        metadata: dict[str, str],
    ) -> ModelTurn | Pending:
        if request.stream is None:
            response = cast("Response", await client.responses.create(**arguments, **body))
            # Remembered: a webhook for it is then placed without asking the API.
            self.created.remember(response.id, metadata)
            return outcome(response, request.handle)
        events = await client.responses.create(**arguments, **body, stream=True)
        return await follow(
            events, request.stream, {}, earlier=request.handle,
            created=lambda response_id: self.created.remember(response_id, metadata),
        )  # fmt: skip

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        import openai

        response_id = request.handle.get(RESPONSE_ID)
        if not isinstance(response_id, str) or not response_id:
            raise ModelError("there is no response to poll (no responseId)", transient=False)
        client = model_client(self._clients, request)
        stream = request.stream
        if stream is not None and stream.resume_after is not None:
            # The stream of an earlier try was lost: go on from its last stored event.
            try:
                events = await client.responses.retrieve(
                    response_id, stream=True, starting_after=stream.resume_after
                )
            except openai.OpenAIError as error:
                failure = classify(error)
                if failure.transient:
                    raise failure from error
                # A service that cannot resume it: poll (its last delta brings the rest).
            else:
                return await follow(
                    events, stream, {RESPONSE_ID: response_id}, earlier=request.handle
                )
        try:
            response = await client.responses.retrieve(response_id)
        except openai.OpenAIError as error:
            raise classify(error) from error
        return outcome(response, request.handle)

    async def locate(self, response_id: str) -> dict[str, str] | None:
        """Where the run of a background response lives (its metadata: ``METADATA_KEYS``), for
        a webhook that names only the response: remembered if this process created it, else
        read from the API (the default endpoint, then each named connection). None when no
        endpoint knows it or it is not the worker's."""
        import openai

        remembered = self.created.get(response_id)
        if remembered is not None:
            return remembered
        connections: list[str | None] = [None, *self._clients.connection_names()]
        for connection in connections:
            try:
                client = self._clients.client(connection)
            except ModelNotConfigured:
                continue
            try:
                response = await client.responses.retrieve(response_id)
            except openai.NotFoundError:
                continue
            except openai.OpenAIError as error:
                raise classify(error) from error
            return run_location(response.metadata)
        return None

    async def cancel(self, request: TurnRequest) -> None:
        """Cancel the run's background response (one that already ended refuses: fine)."""
        import openai

        response_id = request.handle.get(RESPONSE_ID)
        if not isinstance(response_id, str) or not response_id:
            return
        client = model_client(self._clients, request)
        with contextlib.suppress(openai.BadRequestError, openai.NotFoundError):
            await client.responses.cancel(response_id)

"""The ``responses`` backend: the Responses API in background mode (SPEC §5.1).

``begin`` creates a background response (``background=True, store=True``) and returns
``Pending({"responseId": id})``; ``poll`` retrieves it until it leaves ``queued``/``in_progress``.
A completed response's ``function_call`` items become tool calls; after the worker ran them,
``begin`` answers every call with ``function_call_output`` items in a follow-up response chained
by ``previous_response_id``. Without a usable previous response (a new run, a response the
service no longer has) the whole history is sent as input items instead.

Handle keys: ``responseId`` (the newest response of the run) and ``callIds`` (the call ids that
response asked for, so a follow-up is only chained to the response its outputs answer).

Streaming (``TurnRequest.stream``): the background response is created with ``stream=True`` and
the worker keeps its event stream while it holds the run, passing the text on with each event's
``sequence_number``; ``response.created`` tells the stream the response exists (the step
handler stores its id, so a worker that takes the run over after a crash follows it instead of
starting again). When the stream breaks, the call falls back to polling (``Pending``). A poll
whose stream has a resume position (``resume_after``) resumes the event stream with
``retrieve(id, stream=True, starting_after=N)`` instead.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

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


def to_input_items(messages: tuple[ModelMessage, ...]) -> list[dict[str, Any]]:
    """A (repaired) history as Responses input items."""
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


def outcome(response: Response) -> ModelTurn | Pending:
    """What a response says now: still working, ended without an answer, or the model's turn."""
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
    for item in response.output:
        if item.type == "function_call":
            calls.append(ToolCallRef(item.call_id, item.name, item.arguments or ""))
        elif item.type == "message":
            for part in item.content:
                if part.type == "output_text":
                    texts.append(part.text)
                elif part.type == "refusal":
                    texts.append(part.refusal)
    usage = response.usage
    return ModelTurn(
        content="".join(texts) if texts else None,
        tool_calls=tuple(calls),
        usage=Usage(usage.input_tokens, usage.output_tokens, usage.total_tokens)
        if usage
        else Usage(),
        handle={**handle, CALL_IDS: [call.id for call in calls]},
    )


async def follow(
    events: AsyncStream[ResponseStreamEvent], stream: TextStream, handle: dict[str, Any]
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
                    await stream.started(dict(handle), event.sequence_number)
                elif event.type in ("response.output_text.delta", "response.refusal.delta"):
                    await stream.text(event.delta, event.sequence_number)
                elif event.type in ("response.completed", "response.failed", "response.incomplete"):
                    return outcome(event.response)
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

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        import openai  # loaded with the first model call, not at start-up

        client = model_client(self._clients, request)
        arguments: dict[str, Any] = {
            "model": request.model,
            "background": True,
            # A background response that is not stored can be gone before it is polled.
            "store": True,
            "metadata": {"chatId": request.chat_id[:512], "runId": request.run_id[:512]},
            **response_sampling(request),
        }
        if request.instructions:
            # Not carried over by previous_response_id: sent with every response of the run.
            arguments["instructions"] = request.instructions
        tools = response_tools(request)
        if tools:
            arguments["tools"] = tools
            if request.tool_choice is not None:
                arguments["tool_choice"] = response_tool_choice(request.tool_choice)
        previous = _chains_to(request)
        history: dict[str, Any] = {"input": to_input_items(request.messages)}
        try:
            if previous is not None:
                chained: dict[str, Any] = {
                    "previous_response_id": previous,
                    "input": _output_items(request.tool_outputs),
                }
                try:
                    return await self._create(client, request, {**arguments, **chained})
                except openai.OpenAIError as error:
                    if not _is_missing_previous(error):
                        raise
                    # The service no longer has it: the whole history says the same.
            return await self._create(client, request, {**arguments, **history})
        except openai.OpenAIError as error:
            raise classify(error) from error

    async def _create(
        self, client: openai.AsyncOpenAI, request: TurnRequest, arguments: dict[str, Any]
    ) -> ModelTurn | Pending:
        if request.stream is None:
            return outcome(await client.responses.create(**arguments))
        events = await client.responses.create(**arguments, stream=True)
        return await follow(events, request.stream, {})

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
                return await follow(events, stream, {RESPONSE_ID: response_id})
        try:
            response = await client.responses.retrieve(response_id)
        except openai.OpenAIError as error:
            raise classify(error) from error
        return outcome(response)

    async def cancel(self, request: TurnRequest) -> None:
        """Cancel the run's background response (one that already ended refuses: fine)."""
        import openai

        response_id = request.handle.get(RESPONSE_ID)
        if not isinstance(response_id, str) or not response_id:
            return
        client = model_client(self._clients, request)
        with contextlib.suppress(openai.BadRequestError, openai.NotFoundError):
            await client.responses.cancel(response_id)

"""The ``chat`` backend: Chat Completions with tools; the history is ours, in Table Storage.

Works with OpenAI, Azure OpenAI and any OpenAI-compatible server (vLLM, llama.cpp, Ollama)."""

from typing import Any

from worker.backends.base import ModelError, TurnRequest
from worker.backends.clients import ModelClients, ModelNotConfigured
from worker.backends.errors import classify
from worker.runs.history import ModelMessage, to_chat_messages
from worker.runs.model import ModelTurn, Pending, ToolCallRef, Usage


def with_run_instructions(
    messages: tuple[ModelMessage, ...], instructions: str | None
) -> list[ModelMessage]:
    """The run's extra instructions as a system message right after the leading ones."""
    if not instructions:
        return list(messages)
    leading = 0
    while leading < len(messages) and messages[leading].role == "system":
        leading += 1
    extra = ModelMessage(role="system", content=instructions)
    return [*messages[:leading], extra, *messages[leading:]]


def sampling_arguments(request: TurnRequest) -> dict[str, Any]:
    """The sampling fields a request set (reasoning models take max_completion_tokens)."""
    arguments: dict[str, Any] = {}
    if request.temperature is not None and not request.is_reasoning_model:
        arguments["temperature"] = request.temperature
    if request.top_p is not None and not request.is_reasoning_model:
        arguments["top_p"] = request.top_p
    if request.max_tokens is not None:
        key = "max_completion_tokens" if request.is_reasoning_model else "max_tokens"
        arguments[key] = request.max_tokens
    if request.reasoning_effort is not None:
        arguments["reasoning_effort"] = request.reasoning_effort
    return arguments


class ChatBackend:
    """One Chat Completions call per model step; nothing to poll."""

    name = "chat"

    def __init__(self, clients: ModelClients) -> None:
        self._clients = clients

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        import openai  # loaded with the first model call, not at start-up

        if request.hosted_tools:
            kinds = ", ".join(sorted({str(tool.get("type")) for tool in request.hosted_tools}))
            raise ModelError(
                f"hosted tools ({kinds}) need the 'responses' or 'assistants' API, not 'chat'",
                transient=False,
            )
        try:
            client = self._clients.client(request.ai_connection)
        except ModelNotConfigured as error:
            raise ModelError(str(error), transient=False) from error
        arguments: dict[str, Any] = {
            "model": request.model,
            "messages": to_chat_messages(
                with_run_instructions(request.messages, request.instructions)
            ),
            **sampling_arguments(request),
        }
        if request.tools:
            arguments["tools"] = list(request.tools)
            if request.tool_choice is not None:
                arguments["tool_choice"] = request.tool_choice
        try:
            completion = await client.chat.completions.create(**arguments)
        except openai.OpenAIError as error:
            raise classify(error) from error
        if not completion.choices:
            raise ModelError("the model returned no choices", transient=True)
        choice = completion.choices[0]
        message = choice.message
        calls = tuple(
            ToolCallRef(call.id, call.function.name, call.function.arguments or "")
            for call in message.tool_calls or []
            if call.type == "function"
        )
        usage = completion.usage
        cut_short = {"length": "the token limit was reached", "content_filter": "a content filter"}
        return ModelTurn(
            content=message.content,
            tool_calls=calls,
            incomplete=None if calls else cut_short.get(choice.finish_reason or ""),
            usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
            if usage
            else Usage(),
        )

    async def cancel(self, request: TurnRequest) -> None:
        """Chat Completions calls finish within the step: there is nothing to stop."""

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        raise ModelError("the chat API has no pending turns to poll", transient=False)

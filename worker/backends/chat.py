"""The ``chat`` backend: Chat Completions with tools; the history is ours, in Table Storage.

Works with OpenAI, Azure OpenAI and any OpenAI-compatible server (vLLM, llama.cpp, Ollama).

A streamed call (``TurnRequest.stream``) asks for ``stream=true`` with the usage in the last
chunk, passes the text on as it comes, and assembles the answer from the chunks: the text, the
tool calls (several in parallel, each by its index, arguments in pieces) and the usage, so that
what is stored is what the same answer sent whole would have stored. A stream that breaks is a
transient error: the step is retried (and streams again under the next attempt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.decode import join_surrogates
from worker.backends.base import ModelError, TextStream, TurnRequest
from worker.backends.clients import ModelClients, ModelNotConfigured
from worker.backends.errors import classify
from worker.runs.history import ModelMessage, to_chat_messages
from worker.runs.model import ModelTurn, Pending, ToolCallRef, Usage

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionChunk


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
        if request.stream is not None:
            return await self._streamed(client, arguments, request.stream)
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

    async def _streamed(
        self, client: openai.AsyncOpenAI, arguments: dict[str, Any], stream: TextStream
    ) -> ModelTurn:
        import openai

        answer = StreamedAnswer()
        try:
            chunks = await client.chat.completions.create(
                **arguments, stream=True, stream_options={"include_usage": True}
            )
            try:
                async for chunk in chunks:
                    text = answer.add(chunk)
                    if text:
                        await stream.text(text)
            finally:
                await chunks.close()
        except openai.OpenAIError as error:
            raise classify(error) from error
        return answer.turn()

    async def cancel(self, request: TurnRequest) -> None:
        """Chat Completions calls finish within the step: there is nothing to stop."""

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        raise ModelError("the chat API has no pending turns to poll", transient=False)


@dataclass
class _CallParts:
    """One streamed tool call, as its chunks come (by its index)."""

    id: str = ""
    name: str = ""
    kind: str = "function"
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamedAnswer:
    """A chat completion put together from its chunks."""

    texts: list[str] = field(default_factory=list)
    calls: dict[int, _CallParts] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage | None = None

    def add(self, chunk: ChatCompletionChunk) -> str:
        """Take one chunk in; returns its text (what the model wrote), if any."""
        if chunk.usage is not None:
            usage = chunk.usage
            self.usage = Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
        text = ""
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta.content:
                text += delta.content
            for call in delta.tool_calls or []:
                parts = self.calls.setdefault(call.index, _CallParts())
                # Ids and names come whole in a call's first chunk; some servers repeat them.
                parts.id = parts.id or call.id or ""
                parts.kind = call.type or parts.kind
                if call.function is not None:
                    parts.name = parts.name or call.function.name or ""
                    if call.function.arguments:
                        parts.arguments.append(call.function.arguments)
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        if text:
            self.texts.append(text)
        return text

    def turn(self) -> ModelTurn:
        """The answer, as a call without streaming would have returned it."""
        if self.finish_reason is None:
            raise ModelError("the model's stream ended before its answer did", transient=True)
        # Halves of a character sent in two chunks are one character, as in a whole answer.
        text = join_surrogates("".join(self.texts))
        calls = tuple(
            ToolCallRef(
                parts.id, join_surrogates(parts.name), join_surrogates("".join(parts.arguments))
            )
            for _, parts in sorted(self.calls.items())
            if parts.kind == "function"
        )
        cut_short = {"length": "the token limit was reached", "content_filter": "a content filter"}
        return ModelTurn(
            # An answer that only calls tools has no content (null), as when sent whole.
            content=text if text or not calls else None,
            tool_calls=calls,
            incomplete=None if calls else cut_short.get(self.finish_reason),
            usage=self.usage or Usage(),
        )

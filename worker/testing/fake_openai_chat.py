"""Chat Completions for the fake OpenAI server: `POST /chat/completions`, plain or streamed
(`stream=true`: chunks as server-sent events, with `stream_options.include_usage` a last chunk
with the usage, as the real API sends them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker.testing.fake_openai_brain import Conversation, Message, Reply, ToolCall
from worker.testing.fake_openai_common import (
    ApiError,
    new_id,
    opt_bool,
    opt_dict,
    opt_list,
    req_str,
    wall_now,
)
from worker.testing.fake_openai_core import CURRENT_RECORD, FakeCore, body_of
from worker.testing.fake_openai_faults import FaultRule
from worker.testing.fake_openai_stream import SseChannel, StreamEnded, argument_pieces, text_pieces

__all__ = ["ChatApi", "content_text"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def content_text(content: Any, param: str) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise ApiError(400, f"Invalid content part in '{param}'.", param=param)
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
        return "".join(texts)
    raise ApiError(400, f"Invalid type for '{param}': expected a string or an array.", param=param)


def _tool_calls(raw: Any, param: str) -> list[ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, f"Invalid type for '{param}': expected an array.", param=param)
    calls: list[ToolCall] = []
    for index, item in enumerate(raw):
        where = f"{param}[{index}]"
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(function, dict):
            raise ApiError(400, f"Missing required parameter: '{where}.function'.", param=where)
        call_id, name = item.get("id"), function.get("name")
        arguments = function.get("arguments", "")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise ApiError(400, f"'{where}' needs 'id' and 'function.name' strings.", param=where)
        if not isinstance(arguments, str):
            raise ApiError(
                400,
                f"Invalid type for '{where}.function.arguments': expected a string.",
                param=where,
            )
        calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
    return calls


def _messages(raw: list[Any]) -> list[Message]:
    """Normalize and check the history, as strictly as the real API does for tool pairing."""
    messages: list[Message] = []
    block_ids: set[str] = set()  # ids of the tool-call message the current tool block answers
    pending: list[str] = []  # ids of that message not answered yet
    in_block = False
    for index, item in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"Invalid type for '{param}': expected an object.", param=param)
        role = item.get("role")
        text = content_text(item.get("content"), f"{param}.content")
        if role == "tool":
            call_id = item.get("tool_call_id")
            if not in_block or call_id not in block_ids:
                raise ApiError(
                    400,
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    param=f"{param}.role",
                )
            assert isinstance(call_id, str)
            if call_id in pending:
                pending.remove(call_id)
            messages.append(Message(role="tool", content=text, tool_call_id=call_id))
            continue
        if pending:
            raise _unanswered(pending)
        in_block = False
        if role in ("system", "developer"):
            messages.append(Message(role="system", content=text))
        elif role == "user":
            messages.append(Message(role="user", content=text))
        elif role == "assistant":
            calls = _tool_calls(item.get("tool_calls"), f"{param}.tool_calls")
            messages.append(Message(role="assistant", content=text, tool_calls=calls))
            if calls:
                block_ids = {c.id for c in calls}
                pending = [c.id for c in calls]
                in_block = True
        else:
            raise ApiError(
                400,
                f"Invalid value: '{role}'. Supported values are: 'system', 'developer', 'user', "
                "'assistant' and 'tool'.",
                param=f"{param}.role",
                code="invalid_value",
            )
    if pending:
        raise _unanswered(pending)
    return messages


def _unanswered(ids: list[str]) -> ApiError:
    return ApiError(
        400,
        "An assistant message with 'tool_calls' must be followed by tool messages responding to "
        "each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(ids),
        param="messages",
    )


def tool_names(raw: list[Any] | None, *, nested: bool) -> list[str]:
    """Function names of a `tools` array.

    `nested`: the Chat/Assistants shape `{"type": "function", "function": {"name"}}`; else the
    Responses shape `{"type": "function", "name"}`. A function tool in the wrong shape is a 400,
    which catches a backend that sends one API's tools to the other.
    """
    names: list[str] = []
    for index, tool in enumerate(raw or []):
        param = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise ApiError(400, f"Invalid type for '{param}': expected an object.", param=param)
        if tool.get("type") != "function":
            continue  # built-in tools (file_search, web_search...) are accepted and ignored
        holder = tool.get("function") if nested else tool
        key = f"{param}.function.name" if nested else f"{param}.name"
        if not isinstance(holder, dict) or not isinstance(holder.get("name"), str):
            raise ApiError(
                400,
                f"Missing required parameter: '{key}'.",
                param=key,
                code="missing_required_parameter",
            )
        names.append(holder["name"])
    return names


def chat_message(reply: Reply) -> dict[str, Any]:
    """The `choices[0].message` object of a reply."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.content,
        "refusal": None,
        "annotations": [],
    }
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in reply.tool_calls
        ]
    return message


class ChatApi:
    """The Chat Completions endpoint."""

    def __init__(self, core: FakeCore) -> None:
        self.core = core

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path under the API prefix, handler)."""
        return [("POST", "/chat/completions", self.create)]

    async def create(self, request: web.Request) -> web.StreamResponse:
        """`POST /chat/completions`."""
        body = body_of(request)
        # Azure's dated path names the deployment in the URL; the body may then omit `model`.
        model = request.match_info.get("deployment") or req_str(body, "model")
        streamed = bool(opt_bool(body, "stream"))
        options = opt_dict(body, "stream_options")
        if options is not None and not streamed:
            raise ApiError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        rule = await self.core.gate(request, "chat", "chat.create", model, streamed=streamed)
        raw_messages = opt_list(body, "messages")
        if not raw_messages:
            raise ApiError(
                400,
                "Missing required parameter: 'messages'.",
                param="messages",
                code="missing_required_parameter",
            )
        conversation = Conversation(
            model=model,
            api="chat",
            messages=_messages(raw_messages),
            tools=tool_names(opt_list(body, "tools"), nested=True),
            tool_choice=body.get("tool_choice"),
        )
        reply = self.core.brain.decide(conversation)
        prompt, completion = conversation.prompt_tokens(), reply.completion_tokens()
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        if streamed:
            include_usage = bool((options or {}).get("include_usage"))
            return await self._stream(request, model, reply, usage if include_usage else None, rule)
        return web.json_response(
            {
                "id": new_id("chatcmpl", sep="-"),
                "object": "chat.completion",
                "created": wall_now(),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": chat_message(reply),
                        "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                        "logprobs": None,
                    }
                ],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    async def _stream(
        self,
        request: web.Request,
        model: str,
        reply: Reply,
        usage: dict[str, Any] | None,
        rule: FaultRule | None,
    ) -> web.StreamResponse:
        """The reply as chat.completion.chunk events: the role, the text word by word, each
        tool call (its id and name, then its arguments in pieces), the finish reason, and the
        usage when asked for; then ``[DONE]``."""
        texts = text_pieces(reply.content) if reply.content else []
        calls = [(call, argument_pieces(call.arguments)) for call in reply.tool_calls]
        channel = SseChannel(
            request,
            CURRENT_RECORD.get(),
            chunk_delay=self.core.chunk_delay,
            rule=rule,
            chunks=len(texts) + sum(len(pieces) for _, pieces in calls),
            model=model,
        )
        base = {
            "id": new_id("chatcmpl", sep="-"),
            "object": "chat.completion.chunk",
            "created": wall_now(),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        extra = {"usage": None} if usage is not None else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        await channel.open()
        try:
            await channel.send(chunk({"role": "assistant", "content": "", "refusal": None}))
            for piece in texts:
                await channel.chunk(chunk({"content": piece}))
            for index, (call, pieces) in enumerate(calls):
                opening = {"index": index, "id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": ""}}  # fmt: skip
                await channel.send(chunk({"tool_calls": [opening]}))
                for piece in pieces:
                    arguments = {"index": index, "function": {"arguments": piece}}
                    await channel.chunk(chunk({"tool_calls": [arguments]}))
            await channel.send(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
            if usage is not None:
                await channel.send({**base, "choices": [], "usage": usage})
            await channel.send("[DONE]")
        except StreamEnded:
            return channel.response
        return await channel.close()

"""The Responses API of the fake OpenAI server: create (optionally in background), retrieve,
cancel, delete; `previous_response_id` chains keep the whole conversation.

A background response is `queued` for the first third of `background_delay`, `in_progress` until
`background_delay` after its creation, then `completed`. The state is computed when it is read;
the only timer is the webhook's, when webhooks are configured (see `fake_openai_webhooks`): a
background response that ends (`completed` at its delay, or `cancelled`) is announced then.
The reply is decided at creation (one model call per create). `metadata` is kept and returned.

Streaming: every response has its typed events (`response.created`, `response.in_progress`,
the output items with `response.output_text.delta` word by word and
`response.function_call_arguments.delta` in pieces, `response.completed`), each with its
`sequence_number`, scheduled when the response is created. A response created with
`stream=true` produces one chunk of text or arguments every `chunk_delay` seconds and is
`in_progress` until its last one; `GET /responses/{id}?stream=true&starting_after=N` sends the
events after N of a stored response: those already due at once, the rest on their schedule (a
background stream that a client lost is resumed this way).

Reasoning models (a model name with "reason" in it, or a request with `reasoning`) start their
output with a `reasoning` item; its `encrypted_content` is returned when the request's `include`
asks for `reasoning.encrypted_content`. A reasoning item given back as input must carry content
the fake produced (as the real service refuses content it cannot decrypt).
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.testing.fake_openai_brain import Conversation, Message, Reply, ToolCall
from worker.testing.fake_openai_chat import content_text, tool_names
from worker.testing.fake_openai_common import (
    ApiError,
    new_id,
    opt_bool,
    opt_dict,
    opt_list,
    opt_num,
    opt_str,
    req_str,
    wall_now,
)
from worker.testing.fake_openai_core import CURRENT_RECORD, FakeCore, body_of
from worker.testing.fake_openai_faults import FaultRule
from worker.testing.fake_openai_stream import SseChannel, StreamEnded, argument_pieces, text_pieces

__all__ = ["ENCRYPTED_REASONING", "ResponsesApi", "StoredResponse"]

ENCRYPTED_REASONING = "reasoning.encrypted_content"
_INCLUDABLE = frozenset(
    {
        ENCRYPTED_REASONING,
        "message.output_text.logprobs",
        "file_search_call.results",
        "code_interpreter_call.outputs",
    }
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Request fields echoed back on the response object, with the API's defaults.
_ECHOED: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "reasoning": None,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}


@dataclass
class StoredResponse:
    """A response the fake keeps for retrieve and for `previous_response_id`."""

    id: str
    model: str
    background: bool
    store: bool
    echoed: dict[str, Any]
    previous_response_id: str | None
    history: list[Message]  # the conversation after this response (input + output), no instructions
    output: list[dict[str, Any]]
    usage: dict[str, Any]
    created_at: int = field(default_factory=wall_now)
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Created with stream=true: completed when its last chunk is due (``events[-1]``).
    streamed: bool = False
    # The stream's events and when each is due (seconds after ``started``), in order.
    events: list[dict[str, Any]] = field(default_factory=list)
    due: list[float] = field(default_factory=list)

    def status(self, delay: float, now: float | None = None) -> str:
        """The lifecycle state at `now` (monotonic seconds)."""
        if self.cancelled:
            return "cancelled"
        if not self.background and not self.streamed:
            return "completed"
        elapsed = (time.monotonic() if now is None else now) - self.started
        if self.streamed:
            return "completed" if elapsed >= (self.due[-1] if self.due else 0.0) else "in_progress"
        if elapsed >= delay:
            return "completed"
        return "queued" if elapsed < delay / 3 else "in_progress"

    def pending_calls(self) -> list[str]:
        """Call ids of the function calls this response asks the client to answer."""
        return [i["call_id"] for i in self.output if i.get("type") == "function_call"]

    def to_json(self, delay: float, status: str | None = None) -> dict[str, Any]:
        """The `response` object as the API returns it at this moment (or in ``status``)."""
        status = status or self.status(delay)
        done = status == "completed"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": self.background,
            "completed_at": int(self.created_at + (delay if self.background else 0))
            if done
            else None,
            "error": None,
            "incomplete_details": None,
            "model": self.model,
            "output": self.output if done else [],
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "usage": self.usage if done else None,
            "service_tier": "default",
            **self.echoed,
        }


def schedule_events(stored: StoredResponse, chunk_delay: float, delay: float) -> None:
    """Build the response's stream events and when each is due: a streamed response a chunk
    every ``chunk_delay`` seconds; any other at its completion (``delay`` for a background
    one, at once otherwise)."""
    events: list[dict[str, Any]] = []
    due: list[float] = []
    clock = 0.0
    finish = delay if stored.background and not stored.streamed else 0.0

    def add(event: dict[str, Any], chunk: bool = False) -> None:
        nonlocal clock
        if chunk and stored.streamed:
            clock += chunk_delay
        events.append({**event, "sequence_number": len(events)})
        due.append(clock if stored.streamed else (0.0 if len(events) <= 2 else finish))

    add(
        {
            "type": "response.created",
            "response": stored.to_json(delay, "queued" if stored.background else "in_progress"),
        }
    )
    add({"type": "response.in_progress", "response": stored.to_json(delay, "in_progress")})
    for index, item in enumerate(stored.output):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            opened = {**item, "status": "in_progress", "content": []}
            add({"type": "response.output_item.added", "output_index": index, "item": opened})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            add({"type": "response.content_part.added", **where, "part": part})
            for piece in text_pieces(text):
                add(
                    {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []},
                    chunk=True,
                )
            add({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
            add({"type": "response.content_part.done", **where, "part": item["content"][0]})
        elif item["type"] == "reasoning":
            # A reasoning item streams no text: added, then done.
            add({"type": "response.output_item.added", "output_index": index, "item": item})
        else:
            opened = {**item, "status": "in_progress", "arguments": ""}
            add({"type": "response.output_item.added", "output_index": index, "item": opened})
            where = {"item_id": item["id"], "output_index": index}
            for piece in argument_pieces(item["arguments"]):
                add(
                    {"type": "response.function_call_arguments.delta", **where, "delta": piece},
                    chunk=True,
                )
            add({"type": "response.function_call_arguments.done", **where,
                 "arguments": item["arguments"], "name": item["name"]})  # fmt: skip
        add({"type": "response.output_item.done", "output_index": index, "item": item})
    add({"type": "response.completed", "response": stored.to_json(delay, "completed")})
    stored.events, stored.due = events, due


_CHUNK_EVENTS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta"})


def _reply_items(reply: Reply) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if reply.content is not None:
        items.append(
            {
                "type": "message",
                "id": new_id("msg"),
                "role": "assistant",
                "status": "completed",
                "content": [
                    {
                        "type": "output_text",
                        "text": reply.content,
                        "annotations": [],
                        "logprobs": [],
                    }
                ],
            }
        )
    items.extend(
        {
            "type": "function_call",
            "id": new_id("fc"),
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
            "status": "completed",
        }
        for call in reply.tool_calls
    )
    return items


def _reasoning_item(encrypted: str | None) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": new_id("rs"),
        "summary": [{"type": "summary_text", "text": "Thought about which tool answers this."}],
        "encrypted_content": encrypted,
    }


@dataclass
class _Input:
    messages: list[Message]
    outputs: list[str]  # call ids answered by function_call_output items
    calls: list[str]  # call ids of function_call items given in the input
    reasoning: list[dict[str, Any]] = field(default_factory=list)  # reasoning items given


def _parse_input(raw: Any) -> _Input:
    if isinstance(raw, str):
        return _Input([Message(role="user", content=raw)], [], [])
    if not isinstance(raw, list):
        raise ApiError(
            400, "Invalid type for 'input': expected a string or an array.", param="input"
        )
    parsed = _Input([], [], [])
    for index, item in enumerate(raw):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"Invalid type for '{param}': expected an object.", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError(
                    400, f"Invalid value for '{param}.role': {role!r}.", param=f"{param}.role"
                )
            text = content_text(item.get("content"), f"{param}.content")
            parsed.messages.append(
                Message(role="system" if role == "developer" else role, content=text)
            )
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments", "")
            if not (isinstance(call_id, str) and isinstance(name, str)):
                raise ApiError(400, f"'{param}' needs 'call_id' and 'name'.", param=param)
            call = ToolCall(id=call_id, name=name, arguments=str(arguments))
            last = parsed.messages[-1] if parsed.messages else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                last.tool_calls.append(call)  # consecutive calls are one parallel round
            else:
                parsed.messages.append(Message(role="assistant", tool_calls=[call]))
            parsed.calls.append(call_id)
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise ApiError(
                    400,
                    f"Missing required parameter: '{param}.call_id'.",
                    param=f"{param}.call_id",
                )
            text = content_text(output, f"{param}.output")
            parsed.messages.append(Message(role="tool", content=text, tool_call_id=call_id))
            parsed.outputs.append(call_id)
        elif kind == "reasoning":
            if not isinstance(item.get("id"), str) or not isinstance(item.get("summary"), list):
                raise ApiError(400, f"'{param}' needs 'id' and 'summary'.", param=param)
            parsed.reasoning.append(item)
        elif kind == "item_reference":
            continue  # nothing the fake model needs
        else:
            raise ApiError(
                400, f"Invalid value for '{param}.type': {kind!r}.", param=f"{param}.type"
            )
    return parsed


class ResponsesApi:
    """Responses endpoints and their store."""

    def __init__(self, core: FakeCore) -> None:
        self.core = core
        self.responses: dict[str, StoredResponse] = {}
        # The encrypted content of every reasoning item produced, by item id: the service's
        # key, which outlives the responses (a deleted response's items still decrypt).
        self.reasoning: dict[str, str] = {}

    def reset(self) -> None:
        """Forget every stored response."""
        with self.core.lock:
            self.responses.clear()
            self.reasoning.clear()

    def expire(self) -> int:
        """Forget the stored responses (not the reasoning keys); how many there were."""
        with self.core.lock:
            count = len(self.responses)
            self.responses.clear()
            return count

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path under the API prefix, handler)."""
        return [
            ("POST", "/responses", self.create),
            ("GET", "/responses/{id}", self.retrieve),
            ("DELETE", "/responses/{id}", self.delete),
            ("POST", "/responses/{id}/cancel", self.cancel),
        ]

    def _get(self, request: web.Request) -> StoredResponse:
        ident = request.match_info["id"]
        with self.core.lock:
            found = self.responses.get(ident)
        if found is None:
            raise ApiError(404, f"Response with id '{ident}' not found.", param="response_id")
        return found

    async def create(self, request: web.Request) -> web.StreamResponse:
        """`POST /responses`."""
        body = body_of(request)
        model = req_str(body, "model")
        streamed = bool(opt_bool(body, "stream"))
        rule = await self.core.gate(
            request, "responses", "responses.create", model, streamed=streamed
        )
        background = bool(opt_bool(body, "background"))
        store = opt_bool(body, "store")
        # Stricter than the API's `store` default (true): the worker must always send store=true
        # with background (a background response without it can vanish before it is polled).
        if background and store is not True:
            raise ApiError(
                400, "Background mode requires store=true: pass store=true.", param="background"
            )
        instructions = opt_str(body, "instructions")
        tools = opt_list(body, "tools")
        names = tool_names(tools, nested=False)
        for key in ("metadata", "reasoning", "text"):
            opt_dict(body, key)
        for key in ("temperature", "top_p", "max_output_tokens"):
            opt_num(body, key)
        include = self._include(body)
        if "input" not in body:
            raise ApiError(400, "Missing required parameter: 'input'.", param="input")
        new = _parse_input(body["input"])
        for item in new.reasoning:
            given = item.get("encrypted_content")
            if given is not None and self.reasoning.get(item["id"]) != given:
                raise ApiError(
                    400,
                    f"The encrypted content for item {item['id']} could not be verified.",
                    param="input",
                    code="invalid_encrypted_content",
                )
        reasons = "reason" in model.lower() or body.get("reasoning") is not None

        with self.core.lock:
            history = self._history(opt_str(body, "previous_response_id"), new)
            conversation = Conversation(
                model=model,
                api="responses",
                messages=[
                    *([Message(role="system", content=instructions)] if instructions else []),
                    *history,
                    *new.messages,
                ],
                tools=names,
                tool_choice=body.get("tool_choice"),
            )
            reply = self.core.brain.decide(conversation)
            prompt, completion = conversation.prompt_tokens(), reply.completion_tokens()
            stored = StoredResponse(
                id=new_id("resp"),
                model=model,
                background=background,
                store=store is not False,
                echoed={k: body[k] if body.get(k) is not None else v for k, v in _ECHOED.items()},
                previous_response_id=opt_str(body, "previous_response_id"),
                history=[
                    *history,
                    *new.messages,
                    Message(
                        role="assistant", content=reply.content or "", tool_calls=reply.tool_calls
                    ),
                ],
                output=[
                    *([self._reasoned(ENCRYPTED_REASONING in include)] if reasons else []),
                    *_reply_items(reply),
                ],
                usage={
                    "input_tokens": prompt,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": completion,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prompt + completion,
                },
                streamed=streamed,
            )
            schedule_events(stored, self.core.chunk_delay, self.core.background_delay)
            if stored.store:
                self.responses[stored.id] = stored
        if background:
            self._announce_end(stored)
        if streamed:
            return await self._stream(request, stored, -1, rule)
        return web.json_response(stored.to_json(self.core.background_delay))

    def _include(self, body: dict[str, Any]) -> list[str]:
        include = opt_list(body, "include") or []
        if include and not self.core.include_supported:
            raise ApiError(400, "Unsupported parameter: 'include'.", param="include")
        for value in include:
            if value not in _INCLUDABLE:
                raise ApiError(400, f"Invalid value for 'include': {value!r}.", param="include")
        return [str(value) for value in include]

    def _reasoned(self, encrypted: bool) -> dict[str, Any]:
        token = base64.b64encode(secrets.token_bytes(48)).decode()
        item = _reasoning_item(token if encrypted else None)
        self.reasoning[item["id"]] = token
        return item

    def _announce_end(self, stored: StoredResponse) -> None:
        """The webhook of a background response, due when it ends (see the module's doc)."""

        def event() -> str | float | None:
            with self.core.lock:
                delay = self.core.background_delay
                status = stored.status(delay)
            if status in ("queued", "in_progress"):
                return max(stored.started + delay - time.monotonic(), 0.01)
            if status == "cancelled":
                return None  # announced when it was cancelled
            return f"response.{status}"

        self.core.webhooks.response_ended(stored.id, self.core.background_delay, event)

    def _history(self, previous_id: str | None, new: _Input) -> list[Message]:
        """The chained history, after checking that every function call gets its output."""
        history: list[Message] = []
        pending: list[str] = []
        if previous_id is not None:
            previous = self.responses.get(previous_id)
            if previous is None:
                raise ApiError(
                    400,
                    f"Previous response with id '{previous_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            status = previous.status(self.core.background_delay)
            if status != "completed":
                raise ApiError(
                    400,
                    f"Previous response with id '{previous_id}' is {status}, not completed.",
                    param="previous_response_id",
                )
            history = list(previous.history)
            pending = previous.pending_calls()
        for call_id in [*pending, *new.calls]:
            if call_id not in new.outputs:
                raise ApiError(
                    400, f"No tool output found for function call {call_id}.", param="input"
                )
        known = {c.id for m in history for c in m.tool_calls} | set(new.calls)
        for call_id in new.outputs:
            if call_id not in known:
                raise ApiError(
                    400,
                    f"No tool call found for function call output with call_id {call_id}.",
                    param="input",
                )
        return history

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        """`GET /responses/{id}` (a model call for faults: it is how a backend polls); with
        `?stream=true&starting_after=N`, the response's events after N."""
        stored = self._get(request)
        streamed = request.query.get("stream", "").lower() == "true"
        rule = await self.core.gate(
            request, "responses", "responses.retrieve", stored.model, streamed=streamed
        )
        if not streamed:
            return web.json_response(stored.to_json(self.core.background_delay))
        raw = request.query.get("starting_after")
        try:
            after = int(raw) if raw is not None else -1
        except ValueError:
            raise ApiError(
                400, "Invalid 'starting_after': expected an integer.", param="starting_after"
            ) from None
        return await self._stream(request, stored, after, rule)

    async def _stream(
        self, request: web.Request, stored: StoredResponse, after: int, rule: FaultRule | None
    ) -> web.StreamResponse:
        """The events of ``stored`` after sequence number ``after``, each when it is due."""
        pending = [
            (event, due)
            for event, due in zip(stored.events, stored.due, strict=True)
            if event["sequence_number"] > after
        ]
        channel = SseChannel(
            request,
            CURRENT_RECORD.get(),
            chunk_delay=0.0,
            rule=rule,
            chunks=sum(1 for event, _ in pending if event["type"] in _CHUNK_EVENTS),
            model=stored.model,
        )
        await channel.open()
        try:
            for event, due in pending:
                await channel.pause_until(stored.started + due)
                if stored.cancelled:
                    break  # a cancelled response's stream ends
                if event["type"] in _CHUNK_EVENTS:
                    await channel.chunk(event, event=event["type"])
                else:
                    await channel.send(event, event=event["type"])
        except StreamEnded:
            return channel.response
        return await channel.close()

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """`POST /responses/{id}/cancel`: only background responses; a finished one is returned
        unchanged (cancelling is idempotent)."""
        stored = self._get(request)
        if not stored.background:
            raise ApiError(
                400, "Only responses created with background=true can be cancelled.", param="id"
            )
        with self.core.lock:
            cancelled = stored.status(self.core.background_delay) in ("queued", "in_progress")
            if cancelled:
                stored.cancelled = True
            answer = web.json_response(stored.to_json(self.core.background_delay))
        if cancelled:
            self.core.webhooks.response_ended(stored.id, 0.0, lambda: "response.cancelled")
        return answer

    async def delete(self, request: web.Request) -> web.StreamResponse:
        """`DELETE /responses/{id}`."""
        stored = self._get(request)
        with self.core.lock:
            self.responses.pop(stored.id, None)
        return web.json_response({"id": stored.id, "object": "response.deleted", "deleted": True})

"""The Assistants API (v2, beta) of the fake OpenAI server: assistants, threads, messages, runs.

A run is `queued` for a quarter of `background_delay`, then `in_progress`; `background_delay`
after it started (or after its tool outputs were submitted) it applies the model's reply, decided
when it started: `requires_action` with the tool calls, or `completed` with an assistant message
appended to the thread. A run still active `run_expiry` seconds after its creation is `expired`.
A cancelled run is `cancelling`, then `cancelled` at the next read. States are computed when
read; no timer runs. As on the real API, a thread with an active run refuses new messages and
new runs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker.testing.fake_openai_brain import Conversation, Message
from worker.testing.fake_openai_chat import content_text, tool_names
from worker.testing.fake_openai_common import (
    ApiError,
    new_id,
    not_found,
    opt_dict,
    opt_list,
    opt_num,
    opt_str,
    req_str,
    wall_now,
)
from worker.testing.fake_openai_core import FakeCore, body_of
from worker.testing.fake_openai_threads import (
    ACTIVE,
    Run,
    Thread,
    ThreadMessage,
    function_tools,
    page,
)

__all__ = ["AssistantsApi"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AssistantsApi:
    """Assistants, threads, messages and runs, with their store."""

    def __init__(self, core: FakeCore) -> None:
        self.core = core
        self.assistants: dict[str, dict[str, Any]] = {}
        self.threads: dict[str, Thread] = {}

    def reset(self) -> None:
        """Forget every assistant and thread."""
        with self.core.lock:
            self.assistants.clear()
            self.threads.clear()

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path under the API prefix, handler)."""
        return [
            ("POST", "/assistants", self.create_assistant),
            ("GET", "/assistants", self.list_assistants),
            ("GET", "/assistants/{aid}", self.get_assistant),
            ("POST", "/assistants/{aid}", self.modify_assistant),
            ("DELETE", "/assistants/{aid}", self.delete_assistant),
            ("POST", "/threads", self.create_thread),
            ("GET", "/threads/{tid}", self.get_thread),
            ("DELETE", "/threads/{tid}", self.delete_thread),
            ("POST", "/threads/{tid}/messages", self.create_message),
            ("GET", "/threads/{tid}/messages", self.list_messages),
            ("GET", "/threads/{tid}/messages/{mid}", self.get_message),
            ("POST", "/threads/{tid}/runs", self.create_run),
            ("GET", "/threads/{tid}/runs", self.list_runs),
            ("GET", "/threads/{tid}/runs/{rid}", self.get_run),
            ("POST", "/threads/{tid}/runs/{rid}/submit_tool_outputs", self.submit_tool_outputs),
            ("POST", "/threads/{tid}/runs/{rid}/cancel", self.cancel_run),
        ]

    # -- assistants ---------------------------------------------------------------------------

    def _assistant_fields(self, body: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        fields = dict(base)
        for key in ("name", "description", "instructions"):
            if key in body:
                fields[key] = opt_str(body, key)
        for key in ("temperature", "top_p"):
            if key in body:
                fields[key] = opt_num(body, key)
        if "tools" in body:
            fields["tools"] = function_tools(opt_list(body, "tools"))
        if "metadata" in body:
            fields["metadata"] = opt_dict(body, "metadata") or {}
        if "model" in body:
            fields["model"] = req_str(body, "model")
        return fields

    def _assistant(self, aid: str) -> dict[str, Any]:
        found = self.assistants.get(aid)
        if found is None:
            raise not_found("assistant", aid)
        return found

    async def create_assistant(self, request: web.Request) -> web.StreamResponse:
        """`POST /assistants`."""
        body = body_of(request)
        req_str(body, "model")
        base: dict[str, Any] = {
            "id": new_id("asst"),
            "object": "assistant",
            "created_at": wall_now(),
            "name": None,
            "description": None,
            "instructions": None,
            "tools": [],
            "tool_resources": {},
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "response_format": "auto",
        }
        assistant = self._assistant_fields(body, base)
        with self.core.lock:
            self.assistants[assistant["id"]] = assistant
        return web.json_response(assistant)

    async def list_assistants(self, request: web.Request) -> web.StreamResponse:
        """`GET /assistants`."""
        with self.core.lock:
            items = list(self.assistants.values())
        return web.json_response(page(items, request.query))

    async def get_assistant(self, request: web.Request) -> web.StreamResponse:
        """`GET /assistants/{id}`."""
        with self.core.lock:
            return web.json_response(self._assistant(request.match_info["aid"]))

    async def modify_assistant(self, request: web.Request) -> web.StreamResponse:
        """`POST /assistants/{id}`."""
        body = body_of(request)
        with self.core.lock:
            current = self._assistant(request.match_info["aid"])
            updated = self._assistant_fields(body, current)
            self.assistants[updated["id"]] = updated
        return web.json_response(updated)

    async def delete_assistant(self, request: web.Request) -> web.StreamResponse:
        """`DELETE /assistants/{id}`."""
        aid = request.match_info["aid"]
        with self.core.lock:
            self._assistant(aid)
            del self.assistants[aid]
        return web.json_response({"id": aid, "object": "assistant.deleted", "deleted": True})

    # -- threads and messages -----------------------------------------------------------------

    def _thread(self, tid: str) -> Thread:
        found = self.threads.get(tid)
        if found is None:
            raise not_found("thread", tid)
        return found

    @staticmethod
    def _new_message(thread: Thread, raw: Any, param: str) -> ThreadMessage:
        if not isinstance(raw, dict):
            raise ApiError(400, f"Invalid type for '{param}': expected an object.", param=param)
        role = raw.get("role")
        if role not in ("user", "assistant"):
            raise ApiError(
                400,
                f"Invalid value for '{param}.role': {role!r}; expected 'user' or 'assistant'.",
                param=f"{param}.role",
            )
        if raw.get("content") is None:
            raise ApiError(
                400,
                f"Missing required parameter: '{param}.content'.",
                param=f"{param}.content",
            )
        metadata = raw.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ApiError(400, f"Invalid type for '{param}.metadata'.", param=f"{param}.metadata")
        text = content_text(raw.get("content"), f"{param}.content")
        return ThreadMessage(
            id=new_id("msg"), thread_id=thread.id, role=role, text=text, metadata=metadata
        )

    def _active_run(self, thread: Thread) -> Run | None:
        for run in thread.runs.values():
            self._advance(run, thread)
            if run.status in ACTIVE:
                return run
        return None

    async def create_thread(self, request: web.Request) -> web.StreamResponse:
        """`POST /threads` (optional `messages`, `metadata`)."""
        body = body_of(request)
        thread = Thread(id=new_id("thread"), metadata=opt_dict(body, "metadata") or {})
        for index, raw in enumerate(opt_list(body, "messages") or []):
            thread.messages.append(self._new_message(thread, raw, f"messages[{index}]"))
        with self.core.lock:
            self.threads[thread.id] = thread
        return web.json_response(thread.to_json())

    async def get_thread(self, request: web.Request) -> web.StreamResponse:
        """`GET /threads/{id}`."""
        with self.core.lock:
            return web.json_response(self._thread(request.match_info["tid"]).to_json())

    async def delete_thread(self, request: web.Request) -> web.StreamResponse:
        """`DELETE /threads/{id}`."""
        tid = request.match_info["tid"]
        with self.core.lock:
            self._thread(tid)
            del self.threads[tid]
        return web.json_response({"id": tid, "object": "thread.deleted", "deleted": True})

    async def create_message(self, request: web.Request) -> web.StreamResponse:
        """`POST /threads/{id}/messages`."""
        body = body_of(request)
        with self.core.lock:
            thread = self._thread(request.match_info["tid"])
            message = self._new_message(thread, body, "message")
            active = self._active_run(thread)
            if active is not None:
                raise ApiError(
                    400,
                    f"Can't add messages to {thread.id} while a run {active.id} is active.",
                )
            thread.messages.append(message)
            return web.json_response(message.to_json())

    async def list_messages(self, request: web.Request) -> web.StreamResponse:
        """`GET /threads/{id}/messages` (`order` desc by default, `limit`, `after`, `before`,
        `run_id`)."""
        with self.core.lock:
            thread = self._thread(request.match_info["tid"])
            self._active_run(thread)  # brings every run up to date, so replies are listed
            run_id = request.query.get("run_id")
            items = [m.to_json() for m in thread.messages if run_id is None or m.run_id == run_id]
        return web.json_response(page(items, request.query))

    async def get_message(self, request: web.Request) -> web.StreamResponse:
        """`GET /threads/{id}/messages/{mid}`."""
        with self.core.lock:
            thread = self._thread(request.match_info["tid"])
            self._active_run(thread)
            mid = request.match_info["mid"]
            for message in thread.messages:
                if message.id == mid:
                    return web.json_response(message.to_json())
        raise not_found("message", mid)

    # -- runs -----------------------------------------------------------------------------------

    def _run(self, request: web.Request) -> tuple[Thread, Run]:
        thread = self._thread(request.match_info["tid"])
        rid = request.match_info["rid"]
        run = thread.runs.get(rid)
        if run is None:
            raise not_found("run", rid)
        return thread, run

    def _decide(self, run: Run, thread: Thread) -> None:
        """Ask the brain for the run's next reply, shown the thread and the run's own steps."""
        messages = [Message(role="system", content=run.instructions)] if run.instructions else []
        for item in thread.messages:
            if item.run_id != run.id:
                messages.append(
                    Message(role="user" if item.role == "user" else "assistant", content=item.text)
                )
        conversation = Conversation(
            model=run.model,
            api="assistants",
            messages=[*messages, *run.steps],
            tools=run.tool_names,
            tool_choice=run.tool_choice,
        )
        run.pending = self.core.brain.decide(conversation)
        run.prompt_tokens += conversation.prompt_tokens()
        run.completion_tokens += run.pending.completion_tokens()

    def _advance(self, run: Run, thread: Thread) -> None:
        run.advance(thread, delay=self.core.background_delay, expiry=self.core.run_expiry)

    def _run_response(self, run: Run) -> web.Response:
        # Tells the SDK's poll helpers how often to poll: a fraction of the lifecycle.
        poll_ms = max(1, int(self.core.background_delay * 1000 / 5))
        return web.json_response(
            run.to_json(self.core.run_expiry), headers={"openai-poll-after-ms": str(poll_ms)}
        )

    async def create_run(self, request: web.Request) -> web.StreamResponse:
        """`POST /threads/{id}/runs`."""
        body = body_of(request)
        assistant_id = req_str(body, "assistant_id")
        with self.core.lock:
            thread = self._thread(request.match_info["tid"])
            assistant = dict(self._assistant(assistant_id))
        model = opt_str(body, "model") or str(assistant["model"])
        await self.core.gate(request, "assistants", "runs.create", model)
        if body.get("stream"):
            raise ApiError(
                400, "The fake OpenAI server does not support stream=true.", param="stream"
            )
        instructions = opt_str(body, "instructions")
        if instructions is None:
            instructions = assistant.get("instructions") or ""
        additional = opt_str(body, "additional_instructions")
        if additional:
            instructions = f"{instructions}\n{additional}" if instructions else additional
        tools = opt_list(body, "tools")
        tools = function_tools(tools) if tools is not None else list(assistant["tools"])
        extra_messages = opt_list(body, "additional_messages") or []
        with self.core.lock:
            active = self._active_run(thread)
            if active is not None:
                raise ApiError(400, f"Thread {thread.id} already has an active run {active.id}.")
            added = [
                self._new_message(thread, raw, f"additional_messages[{i}]")
                for i, raw in enumerate(extra_messages)
            ]
            thread.messages.extend(added)
            run = Run(
                id=new_id("run"),
                thread_id=thread.id,
                assistant_id=assistant_id,
                model=model,
                instructions=instructions,
                tools=tools,
                tool_names=tool_names(tools, nested=True),
                tool_choice=body.get("tool_choice"),
                extra={
                    "metadata": opt_dict(body, "metadata") or {},
                    **{
                        key: assistant.get(key) if opt_num(body, key) is None else body[key]
                        for key in ("temperature", "top_p")
                    },
                },
            )
            self._decide(run, thread)
            thread.runs[run.id] = run
            self._advance(run, thread)
            return self._run_response(run)

    async def list_runs(self, request: web.Request) -> web.StreamResponse:
        """`GET /threads/{id}/runs`."""
        with self.core.lock:
            thread = self._thread(request.match_info["tid"])
            self._active_run(thread)
            items = [r.to_json(self.core.run_expiry) for r in thread.runs.values()]
        return web.json_response(page(items, request.query))

    async def get_run(self, request: web.Request) -> web.StreamResponse:
        """`GET /threads/{id}/runs/{rid}` (a model call for faults: it is how clients poll)."""
        with self.core.lock:
            thread, run = self._run(request)
        await self.core.gate(request, "assistants", "runs.retrieve", run.model)
        with self.core.lock:
            self._advance(run, thread)
            return self._run_response(run)

    async def submit_tool_outputs(self, request: web.Request) -> web.StreamResponse:
        """`POST /threads/{id}/runs/{rid}/submit_tool_outputs`: every pending call answered."""
        body = body_of(request)
        with self.core.lock:
            thread, run = self._run(request)
        await self.core.gate(request, "assistants", "runs.submit", run.model)
        if body.get("stream"):
            raise ApiError(
                400, "The fake OpenAI server does not support stream=true.", param="stream"
            )
        raw_outputs = opt_list(body, "tool_outputs")
        if raw_outputs is None:
            raise ApiError(400, "Missing required parameter: 'tool_outputs'.", param="tool_outputs")
        outputs: dict[str, str] = {}
        for index, item in enumerate(raw_outputs):
            param = f"tool_outputs[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("tool_call_id"), str):
                raise ApiError(
                    400, f"Missing required parameter: '{param}.tool_call_id'.", param=param
                )
            output = item.get("output", "")
            outputs[item["tool_call_id"]] = output if isinstance(output, str) else str(output)
        with self.core.lock:
            self._advance(run, thread)
            if run.status != "requires_action":
                raise ApiError(400, f'Runs in status "{run.status}" do not accept tool outputs.')
            expected = [c.id for c in run.required]
            unknown = [i for i in outputs if i not in expected]
            missing = [i for i in expected if i not in outputs]
            if unknown or missing:
                raise ApiError(
                    400,
                    f"Expected tool outputs for call_ids {expected}, got {list(outputs)}.",
                    param="tool_outputs",
                )
            run.steps.extend(
                Message(role="tool", content=outputs[call_id], tool_call_id=call_id)
                for call_id in expected
            )
            run.required = []
            run.status = "queued"
            run.phase_start = time.monotonic()
            self._decide(run, thread)
            self._advance(run, thread)
            return self._run_response(run)

    async def cancel_run(self, request: web.Request) -> web.StreamResponse:
        """`POST /threads/{id}/runs/{rid}/cancel`."""
        with self.core.lock:
            thread, run = self._run(request)
            self._advance(run, thread)
            if run.status not in ("queued", "in_progress", "requires_action"):
                raise ApiError(400, f"Cannot cancel run with status '{run.status}'.")
            run.status = "cancelling"
            run.cancel_requested = time.monotonic()
            run.cancelled_at = wall_now()
            run.required = []
            run.pending = None
            return self._run_response(run)

"""The ``assistants`` backend: the Assistants API v2 (assistant, thread, message, run).

OpenAI sunset this API on 2026-08-26 and Azure retires it too; the backend exists so that the
flow of the Assistants SDK samples works unchanged where it is still served. New deployments
should use ``responses``. Every ``client.beta.*`` call emits a ``DeprecationWarning``; it is
silenced here, around the (synchronous) call only, never globally.

Chat-level objects, created on a chat's first run and kept in the chat's state
(``request.remote``): the assistant (model, the chat's system messages as instructions, tools,
hosted tool resources) and the thread (seeded with the chat's earlier user/assistant text; an
Assistants thread holds no tool rounds). A thread that is gone remotely is replaced by a new one
seeded the same way (the stored history is the source of truth).

One worker run is one remote run:

- ``begin`` (no tool outputs) starts it with ``runs.create``; this run's user message goes in
  with it (``additional_messages``, tagged ``metadata.runId``), so the message and the run are
  added together or not at all. The newest remote run is checked first: if it is already this
  run's (an earlier delivery created it), it is adopted instead of started twice; if an older
  run still holds the thread (one the worker stopped waiting for), it is cancelled and the start
  is retried from ``poll``.
- ``begin`` with tool outputs submits them (``submit_tool_outputs``); a refused submission whose
  outputs were in fact taken (an earlier delivery) is recognised and polled instead.
- ``poll`` retrieves the run: ``requires_action`` becomes the model's tool calls, ``completed``
  the text of the run's assistant messages, and ``expired``/``cancelled``/``failed``/
  ``incomplete`` end the worker run the same way.

Handle keys: ``assistantId``, ``threadId`` (also stored chat-wide by the step handler) and
``remoteRunId``. Objects created by a call are returned in the handle even when a later request
of the same call fails, so that they are never orphaned.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from worker.backends.base import ModelError, TurnRequest
from worker.backends.clients import ModelClients
from worker.backends.errors import classify
from worker.backends.responses import hosted_ids, model_client
from worker.runs.history import ModelMessage, cap_tool_output
from worker.runs.model import ModelTurn, Pending, RunStatus, ToolCallRef, Usage

if TYPE_CHECKING:
    import openai
    from openai.types.beta.threads import Run

ASSISTANT_ID = "assistantId"
THREAD_ID = "threadId"
REMOTE_RUN_ID = "remoteRunId"

# The API's limits: messages given to threads.create, and characters of one message or of the
# assistant's instructions.
MAX_SEED_MESSAGES = 32
MAX_TEXT_CHARS = 256_000

_ACTIVE = frozenset({"queued", "in_progress", "requires_action", "cancelling"})
_WORKING = frozenset({"queued", "in_progress", "cancelling"})
_ENDED: dict[str, RunStatus] = {
    "expired": "expired",
    "cancelled": "cancelled",
    "failed": "failed",
    "incomplete": "incomplete",
}

T = TypeVar("T")


def _beta(call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
    """Make a ``client.beta`` request without its DeprecationWarning escaping.

    Only the synchronous call that builds the request is wrapped: ``catch_warnings`` swaps
    process-wide state, which must not stay swapped across an ``await``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return call()


def _text(text: str) -> str:
    return cap_tool_output(text, MAX_TEXT_CHARS)


def assistant_tools(request: TurnRequest) -> list[dict[str, Any]]:
    """Function tools (the Assistants shape is the Chat Completions one) and hosted tools."""
    tools: list[dict[str, Any]] = [
        {"type": "function", "function": dict(tool["function"])}
        for tool in request.tools
        if tool.get("type") == "function" and isinstance(tool.get("function"), dict)
    ]
    for hosted in request.hosted_tools:
        kind = hosted.get("type")
        if kind in ("file_search", "code_interpreter"):
            tools.append({"type": kind})
        else:
            tools.append(dict(hosted))
    return tools


def tool_resources(request: TurnRequest) -> dict[str, Any]:
    """The assistant's ``tool_resources``: code interpreter files, file search vector stores."""
    resources: dict[str, Any] = {}
    for hosted in request.hosted_tools:
        kind = hosted.get("type")
        if kind == "code_interpreter":
            file_ids = hosted_ids(hosted, "fileIds", "file_ids")
            if file_ids:
                resources["code_interpreter"] = {"file_ids": file_ids}
        elif kind == "file_search":
            store_ids = hosted_ids(hosted, "vectorStoreIds", "vector_store_ids")
            if store_ids:
                resources["file_search"] = {"vector_store_ids": store_ids}
    return resources


def seed_messages(request: TurnRequest) -> list[dict[str, Any]]:
    """The chat's earlier user/assistant text, for a new thread (tool rounds flattened away).

    This run's own user message is left out (it is added with the run); only the newest
    ``MAX_SEED_MESSAGES`` fit in ``threads.create``.
    """
    messages: list[ModelMessage] = list(request.messages)
    if messages and messages[-1].role == "user" and messages[-1].content == request.user_message:
        messages.pop()
    seeded = [
        {"role": message.role, "content": _text(message.content)}
        for message in messages
        if message.role in ("user", "assistant") and message.content
    ]
    return seeded[-MAX_SEED_MESSAGES:]


def _instructions(request: TurnRequest) -> str | None:
    parts = [m.content for m in request.messages if m.role == "system" and m.content]
    return _text("\n\n".join(parts)) if parts else None


def _run_arguments(request: TurnRequest, assistant_id: str) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "assistant_id": assistant_id,
        "model": request.model,
        # The run's tools, so the current tool set applies even to an older assistant.
        "tools": assistant_tools(request),
        "metadata": {"runId": request.run_id[:512], "chatId": request.chat_id[:512]},
    }
    if request.user_message:
        arguments["additional_messages"] = [
            {
                "role": "user",
                "content": _text(request.user_message),
                "metadata": {"runId": request.run_id[:512]},
            }
        ]
    if request.instructions:
        arguments["additional_instructions"] = request.instructions
    if arguments["tools"] and request.tool_choice is not None:
        arguments["tool_choice"] = request.tool_choice
    if request.temperature is not None and not request.is_reasoning_model:
        arguments["temperature"] = request.temperature
    if request.top_p is not None and not request.is_reasoning_model:
        arguments["top_p"] = request.top_p
    if request.max_tokens is not None:
        # Over the whole run (every tool round); beyond it the run ends incomplete.
        arguments["max_completion_tokens"] = request.max_tokens
    if request.reasoning_effort is not None:
        arguments["reasoning_effort"] = request.reasoning_effort
    return arguments


def _known(request: TurnRequest, key: str) -> str | None:
    value = request.handle.get(key) or request.remote.get(key)
    return value if isinstance(value, str) and value else None


def _required_ids(run: Run) -> set[str]:
    action = run.required_action
    if run.status != "requires_action" or action is None:
        return set()
    return {call.id for call in action.submit_tool_outputs.tool_calls}


def _thread_busy(error: openai.BadRequestError) -> bool:
    """The service's 400 for a thread that already has an active run."""
    return "already has an active run" in str(error.message or error).lower()


def _why_ended(run: Run) -> str:
    if run.last_error is not None and run.last_error.message:
        return f"the remote run {run.status}: {run.last_error.message}"
    details = run.incomplete_details
    if details is not None and details.reason:
        return f"the remote run is {run.status}: {details.reason}"
    return f"the remote run {run.status}"


class AssistantsBackend:
    """Assistants API runs, polled; tool calls answered with ``submit_tool_outputs``."""

    name = "assistants"

    def __init__(self, clients: ModelClients) -> None:
        self._clients = clients

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        client = model_client(self._clients, request)
        if request.tool_outputs:
            return await self._submit(client, request)
        return await self._start(client, request)

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        import openai  # loaded with the first model call, not at start-up

        client = model_client(self._clients, request)
        thread_id = _known(request, THREAD_ID)
        remote_run = request.handle.get(REMOTE_RUN_ID)
        if not thread_id or not isinstance(remote_run, str) or not remote_run:
            # Not started yet (the chat's objects were just created, or an older run was
            # being cancelled): start it now.
            return await self._start(client, request)
        handle = self._handle(request, remote_run)
        try:
            run = await _beta(
                lambda: client.beta.threads.runs.retrieve(remote_run, thread_id=thread_id)
            )
            return await self._outcome(client, run, handle)
        except openai.OpenAIError as error:
            raise classify(error) from error

    async def cancel(self, request: TurnRequest) -> None:
        """Cancel the run's remote run, so the thread is free and stops spending tokens."""
        import openai  # loaded with the first model call, not at start-up

        thread_id = _known(request, THREAD_ID)
        remote_run = request.handle.get(REMOTE_RUN_ID)
        if not thread_id or not isinstance(remote_run, str) or not remote_run:
            return
        client = model_client(self._clients, request)
        # A run that already ended refuses to be cancelled: nothing to do then.
        with contextlib.suppress(openai.BadRequestError, openai.NotFoundError):
            await _beta(lambda: client.beta.threads.runs.cancel(remote_run, thread_id=thread_id))

    # -- starting a run -------------------------------------------------------------------------

    async def _start(self, client: openai.AsyncOpenAI, request: TurnRequest) -> ModelTurn | Pending:
        import openai  # loaded with the first model call, not at start-up

        ids: dict[str, str] = {}
        assistant_id = _known(request, ASSISTANT_ID)
        thread_id = _known(request, THREAD_ID)
        if assistant_id:
            ids[ASSISTANT_ID] = assistant_id
        if thread_id:
            ids[THREAD_ID] = thread_id
        created = False
        try:
            if not assistant_id:
                assistant_id = await self._create_assistant(client, request)
                ids[ASSISTANT_ID] = assistant_id
                created = True
            if thread_id:
                try:
                    waiting = await self._newest_run(client, request, thread_id, dict(ids))
                except openai.NotFoundError:
                    # The thread is gone (deleted remotely): the stored history seeds a new one.
                    thread_id = None
                    del ids[THREAD_ID]
                else:
                    if waiting is not None:
                        return waiting
            if not thread_id:
                messages = seed_messages(request)
                thread = await _beta(
                    lambda: client.beta.threads.create(
                        messages=messages,  # type: ignore[arg-type]
                        metadata={"chatId": request.chat_id[:512]},
                    )
                )
                thread_id = ids[THREAD_ID] = thread.id
                created = True
            arguments = _run_arguments(request, assistant_id)
            try:
                run = await _beta(lambda: client.beta.threads.runs.create(thread_id, **arguments))
            except openai.BadRequestError as error:
                if not _thread_busy(error):
                    raise
                # Another copy of this step (or an older run) got the thread first: a race,
                # not a bad request. The next poll finds this run's remote run, or cancels
                # the older one and starts it.
                return Pending(ids)
            return await self._outcome(client, run, {**ids, REMOTE_RUN_ID: run.id})
        except openai.OpenAIError as error:
            problem = classify(error)
            if not created:
                raise problem from error
            # What this call created must reach the chat's state, or it is orphaned: hand the
            # ids back; a transient failure resumes from poll (which starts the run).
            if problem.transient:
                return Pending(ids)
            return Pending(ids, ended="failed", error=problem.message)

    async def _create_assistant(self, client: openai.AsyncOpenAI, request: TurnRequest) -> str:
        arguments: dict[str, Any] = {
            "model": request.model,
            "name": request.chat_id[:256],
            "tools": assistant_tools(request),
            "metadata": {"chatId": request.chat_id[:512]},
        }
        instructions = _instructions(request)
        if instructions:
            arguments["instructions"] = instructions
        resources = tool_resources(request)
        if resources:
            arguments["tool_resources"] = resources
        assistant = await _beta(lambda: client.beta.assistants.create(**arguments))
        return assistant.id

    async def _newest_run(
        self,
        client: openai.AsyncOpenAI,
        request: TurnRequest,
        thread_id: str,
        ids: dict[str, str],
    ) -> ModelTurn | Pending | None:
        """This run's remote run if an earlier delivery started it; Pending while an older
        run still holds the thread (it is cancelled); None when the thread is free."""
        import openai  # loaded with the first model call, not at start-up

        page = await _beta(lambda: client.beta.threads.runs.list(thread_id, limit=1, order="desc"))
        if not page.data:
            return None
        newest = page.data[0]
        if (newest.metadata or {}).get("runId") == request.run_id:
            return await self._outcome(client, newest, {**ids, REMOTE_RUN_ID: newest.id})
        if newest.status not in _ACTIVE:
            return None
        if newest.status != "cancelling":
            # A BadRequestError: it ended meanwhile, and the next poll finds the thread free.
            with contextlib.suppress(openai.BadRequestError):
                await _beta(lambda: client.beta.threads.runs.cancel(newest.id, thread_id=thread_id))
        return Pending(ids)

    # -- tool outputs ---------------------------------------------------------------------------

    async def _submit(
        self, client: openai.AsyncOpenAI, request: TurnRequest
    ) -> ModelTurn | Pending:
        import openai  # loaded with the first model call, not at start-up

        thread_id = _known(request, THREAD_ID)
        remote_run = request.handle.get(REMOTE_RUN_ID)
        if not thread_id or not isinstance(remote_run, str) or not remote_run:
            raise ModelError(
                "there is no remote run to submit the tool outputs to (no threadId/remoteRunId)",
                transient=False,
            )
        handle = self._handle(request, remote_run)
        outputs = [
            {"tool_call_id": call_id, "output": output} for call_id, output in request.tool_outputs
        ]
        try:
            try:
                run = await _beta(
                    lambda: client.beta.threads.runs.submit_tool_outputs(
                        remote_run,
                        thread_id=thread_id,
                        tool_outputs=outputs,  # type: ignore[arg-type]
                    )
                )
            except openai.BadRequestError as error:
                # Refused: perhaps an earlier delivery of this step submitted them already.
                current = await _beta(
                    lambda: client.beta.threads.runs.retrieve(remote_run, thread_id=thread_id)
                )
                if _required_ids(current) == {call_id for call_id, _ in request.tool_outputs}:
                    raise classify(error) from error  # still waiting for these: truly refused
                return await self._outcome(client, current, handle)
            return await self._outcome(client, run, handle)
        except openai.OpenAIError as error:
            raise classify(error) from error

    # -- results --------------------------------------------------------------------------------

    @staticmethod
    def _handle(request: TurnRequest, remote_run: str) -> dict[str, Any]:
        handle: dict[str, Any] = {
            key: value for key in (ASSISTANT_ID, THREAD_ID) if (value := _known(request, key))
        }
        handle[REMOTE_RUN_ID] = remote_run
        return handle

    async def _outcome(
        self, client: openai.AsyncOpenAI, run: Run, handle: dict[str, Any]
    ) -> ModelTurn | Pending:
        """What a remote run says now (may read the run's messages once it completed)."""
        status = run.status
        if status in _WORKING:
            return Pending(handle)
        if status == "requires_action":
            action = run.required_action
            calls = tuple(
                ToolCallRef(call.id, call.function.name, call.function.arguments or "")
                for call in (action.submit_tool_outputs.tool_calls if action else [])
                if call.type == "function"
            )
            if not calls:
                return Pending(
                    handle, ended="failed", error="the remote run requires an unknown action"
                )
            # Usage comes with the run's end, summed over the whole run.
            return ModelTurn(content=None, tool_calls=calls, handle=handle)
        if status == "completed":
            page = await _beta(
                lambda: client.beta.threads.messages.list(
                    run.thread_id, run_id=run.id, order="asc", limit=100
                )
            )
            texts = [
                block.text.value
                for message in page.data
                if message.role == "assistant"
                for block in message.content
                if block.type == "text"
            ]
            usage = run.usage
            return ModelTurn(
                content="\n\n".join(texts),
                usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
                if usage
                else Usage(),
                handle=handle,
            )
        ended = _ENDED.get(status)
        if ended is not None:
            return Pending(handle, ended=ended, error=_why_ended(run))
        return Pending(handle, ended="failed", error=f"the remote run has status {status!r}")

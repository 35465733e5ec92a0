"""The interface every model backend implements, and the errors it raises.

A backend does one model interaction per call and returns what happened as a value: a
``ModelTurn`` (the model answered) or ``Pending`` (a background response / remote run is still
working; poll its handle later). It never sleeps and never persists anything: the run state
machine decides, the step handler stores.
"""

from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.requests import DEFAULT_COLLECTION, DEFAULT_STORAGE_SETTING
from worker.runs.history import ModelMessage
from worker.runs.model import ModelTurn, Pending


class TextStream(Protocol):
    """Where a streamed model call writes what the model produces (``TurnRequest.stream``,
    SPEC §5.4). The backend calls ``started`` once remote work exists that a later try could
    follow (a background response: its handle, and the position of its first event in the
    response's event stream), and ``text`` for each piece of text the model writes, with its
    position in that event stream when it has one. ``resume_after``: an earlier try's stream
    was lost after this position; go on from there instead of starting again (None: start)."""

    @property
    def resume_after(self) -> int | None: ...

    async def started(self, handle: dict[str, Any], position: int) -> None: ...

    async def text(self, text: str, position: int | None = None) -> None: ...


@dataclass(frozen=True)
class TurnRequest:
    """Everything a backend needs for one model call of a run."""

    chat_id: str
    run_id: str
    model: str
    # The chat as the model should see it: trimmed, tool pairs repaired, outputs capped.
    messages: tuple[ModelMessage, ...]
    # Function tools in Chat Completions format ({"type": "function", "function": {...}}).
    tools: tuple[dict[str, Any], ...] = ()
    # Hosted tools ({"type": "code_interpreter"}, {"type": "file_search", ...}) as configured.
    hosted_tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    # Extra instructions for this run only (createRun's additional_instructions).
    instructions: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    is_reasoning_model: bool = False
    ai_connection: str | None = None
    # The run's backend handle so far (a response id, a remote run id) and the chat's
    # long-lived remote ids (the Assistants API's assistant and thread).
    handle: dict[str, Any] = field(default_factory=dict)
    remote: dict[str, Any] = field(default_factory=dict)
    # Outputs of the tool calls of the previous turn, (call id, output), for backends that
    # continue a remote conversation (function_call_output, submit_tool_outputs).
    tool_outputs: tuple[tuple[str, str], ...] = ()
    # The user message that started this run (backends with a remote thread add it there).
    user_message: str = ""
    # Set when the call streams its output (``chat`` and ``responses``); None: it does not.
    stream: TextStream | None = None
    # Where the chat lives: a background response names it in its metadata, so that the
    # provider's webhook finds the run (SPEC §5.1).
    collection: str = DEFAULT_COLLECTION
    storage_setting: str = DEFAULT_STORAGE_SETTING


class ModelError(Exception):
    """A model call failed. ``transient``: retry the step later (429, 5xx, timeouts)."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.retry_after = retry_after
        # The HTTP status the service answered (None: no answer, or not an HTTP failure).
        self.status = status


class Backend(Protocol):
    """One model API."""

    name: str

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        """Ask the model for the next turn (or start it in the background)."""

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        """Check a pending turn named by ``request.handle``."""

    async def cancel(self, request: TurnRequest) -> None:
        """Stop the remote work named by ``request.handle``, if any (best effort: the run
        has already ended for the worker)."""


class BackendWrapper:
    """A backend around another: ``begin``, ``poll`` and ``cancel`` pass through, as does every
    other attribute. Subclasses observe the calls they override (metrics, traces)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.name: str = backend.name

    @property
    def wrapped(self) -> Backend:
        return self._backend

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found here: everything else is the backend's.
        return getattr(self._backend, name)

    async def begin(self, request: TurnRequest) -> ModelTurn | Pending:
        return await self._backend.begin(request)

    async def poll(self, request: TurnRequest) -> ModelTurn | Pending:
        return await self._backend.poll(request)

    async def cancel(self, request: TurnRequest) -> None:
        # Not a model call: never observed.
        await self._backend.cancel(request)

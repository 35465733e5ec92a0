"""Live output of a streamed run's model calls (SPEC §4.5, §5.4): which writer a model call
gets, how its deltas are numbered, and where a ``responses`` call keeps its resume position.

Numbering: ``step`` is the run's model call (``StreamProgress.calls``: polls and tool rounds do
not count); ``attempt`` the try of that call: the first attempt the run's row allows
(``StreamProgress.attempt``, raised by a stored transient failure) plus the redeliveries of
the message carrying the step (a try lost in a crash is counted by its message's dequeue count;
a step taken in-process carries its carrier's). A ``responses`` call resumed after a crash, or
followed by polls after its stream broke, keeps its attempt, and its ``seq`` goes on.

Where a ``responses`` call is: while its stream runs, in its claim row (``claim-<run>-<step>``,
which its holder renews anyway): the response's id when it is created, then the checkpoint of
each delta before the delta is sent (``Stream``, ``StreamText``). Once the call has an outcome
(an answer, or a broken stream left to the polls), in its handle (``stream``: the next delta's
seq and first character), stored with the claim's result and then with the run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from handlers.services import ChatRef, RunServices
from worker.loop.handling import MessageContext
from worker.runs import machine
from worker.runs.model import ModelTurn, Pending, Run
from worker.store.layout import join_text, split_text
from worker.store.protocol import ClaimProgress
from worker.streaming.sinks import Sink
from worker.streaming.writer import Checkpoint, DeltaSource, DeltaWriter, Progress

# The backends whose model calls stream (the legacy Assistants API answers with the reply alone).
STREAMING_APIS = frozenset({"chat", "responses"})
# Where a call's stream progress is kept in its handle.
PROGRESS_KEY = "stream"
# Properties of a model call's claim row.
HANDLE_PROPERTY = "Handle"
CHECKPOINT_PROPERTY = "Stream"
CHECKPOINT_TEXT = "StreamText"


class LiveOutput:
    """The deltas of one step of a streamed run."""

    def __init__(
        self, services: RunServices, chat_id: str, run: Run, sink: Sink, dequeue_count: int
    ) -> None:
        assert run.stream is not None
        self._services = services
        self._chat_id = chat_id
        self._run = run
        self._sink = sink
        self.step = run.stream.calls
        # A redelivered message is a try that started over (its earlier delivery died).
        self.attempt = run.stream.attempt + max(dequeue_count - 1, 0)

    @staticmethod
    def claims_chat_call(services: RunServices, run: Run) -> bool:
        """Whether a model step of ``run`` claims its ``chat`` call (which has no remote work to
        claim): only when it streams, so that two copies of the step (a duplicated step message)
        never stream under one attempt, where a consumer would mix their deltas."""
        streams = services.streams
        return (
            run.phase == "model"
            and run.api == "chat"
            and run.stream is not None
            and streams is not None
            and streams.can_stream(run.reply_to)
        )

    @classmethod
    def of(
        cls, services: RunServices, chat: ChatRef, run: Run, context: MessageContext
    ) -> LiveOutput | None:
        """The live output of this step of ``run``; None when the run does not stream."""
        streams = services.streams
        if run.stream is None or streams is None or run.api not in STREAMING_APIS:
            return None
        sink = streams.for_request(chat.chat_id, run.request_id, run.reply_to)
        if sink is None:
            return None
        return cls(services, chat.chat_id, run, sink, context.dequeue_count)

    def _writer(
        self,
        attempt: int,
        *,
        seq: int = 0,
        chars: int = 0,
        resume: Checkpoint | None = None,
        held: ClaimProgress | None = None,
    ) -> DeltaWriter:
        services = self._services
        streams = services.streams
        run = self._run
        source = DeltaSource(chat_id=self._chat_id, run_id=run.run_id,
                             request_id=run.request_id, step=self.step, attempt=attempt,
                             api=run.api)  # fmt: skip
        checkpoint = on_started = None
        if held is not None:

            async def checkpoint(point: Checkpoint) -> None:
                text = point.text or ""
                await held.save(
                    {
                        CHECKPOINT_PROPERTY: json.dumps(_checkpoint_json(point)),
                        **split_text(CHECKPOINT_TEXT, text, counted=True),
                    }
                )

            async def on_started(handle: dict[str, Any], point: Checkpoint) -> None:
                await held.save(
                    {
                        HANDLE_PROPERTY: json.dumps(handle),
                        CHECKPOINT_PROPERTY: json.dumps(_checkpoint_json(point)),
                    }
                )

        return DeltaWriter(
            self._sink,
            source,
            services.settings.stream_interval_ms / 1000,
            seq=seq,
            chars=chars,
            resume=resume,
            checkpoint=checkpoint,
            on_started=on_started,
            observer=streams.observer if streams is not None else None,
            redact=services.redact,
        )

    def fresh(
        self, held: ClaimProgress | None = None, *, attempt: int | None = None
    ) -> DeltaWriter:
        """A new try of the call (``held``: its claim, where a ``responses`` call keeps its
        resume position; ``attempt``: a higher one than this delivery's, when the try follows
        one that died holding the call's claim)."""
        return self._writer(self.attempt if attempt is None else attempt, held=held)

    def following(self, handle: dict[str, Any]) -> DeltaWriter | None:
        """The writer of a call that goes on by polling (its stream broke, or it was answered
        and its step is done again): same attempt, ``seq`` goes on from the handle."""
        progress = Progress.from_json(handle.get(PROGRESS_KEY))
        if progress is None or progress.step != self.step:
            return None
        return self._writer(progress.attempt, seq=progress.seq, chars=progress.chars)

    def resumed(self, left: dict[str, Any], held: ClaimProgress) -> DeltaWriter | None:
        """The writer of a call taken over from a worker that died while it streamed, from
        what that worker saved in the claim row: None when it had not created the response."""
        try:
            saved = json.loads(left.get(CHECKPOINT_PROPERTY) or "null")
            text = join_text(left, CHECKPOINT_TEXT) if saved and saved.get("resend") else None
            point = Checkpoint.from_json(saved, text) if saved else None
        except (TypeError, ValueError, KeyError):
            point = None
        if point is None or not started_handle(left):
            return None
        return self._writer(point.attempt, resume=point, held=held)

    async def finish(self, writer: DeltaWriter, turn: ModelTurn) -> ModelTurn:
        """The call's last delta (the rest of its text, the calls it ended with); the answer
        counts its deltas (the reply's ``deltaCount``)."""
        calls = machine.unique_call_ids(turn.tool_calls, self._run)
        await writer.finish(turn.content, [(call.id, call.name) for call in calls])
        return replace(turn, deltas=writer.count)


def with_progress(result: ModelTurn | Pending, writer: DeltaWriter) -> ModelTurn | Pending:
    """The call's outcome with where its stream got in its handle: a call left to the polls
    goes on from there, and a copy of a step that finds the call answered sends its last delta
    again, as it was."""
    return replace(result, handle={**result.handle, PROGRESS_KEY: writer.progress().to_json()})


def started_handle(left: dict[str, Any]) -> dict[str, Any]:
    """The handle a worker saved in a claim row when its response was created ({} if none)."""
    try:
        handle = json.loads(join_text(left, HANDLE_PROPERTY) or "{}")
    except ValueError:
        return {}
    return handle if isinstance(handle, dict) else {}


def _checkpoint_json(point: Checkpoint) -> dict[str, Any]:
    return {**point.to_json(), "resend": point.text is not None}

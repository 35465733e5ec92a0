"""``assistantPost``: append a user message and run a turn (one active run per chat).

The run is recorded with its user message before the request is acknowledged. If no run is
active it starts at once: its user message is appended to the chat, and its first steps are
taken in-process while this post stays leased as the run's carrier (see ``worker.loop.worker``);
otherwise it waits in the chat's queue and starts when the runs before it have ended.
"""

import asyncio
import random
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from handlers.live import STREAMING_APIS
from handlers.services import ChatRef, RunServices
from handlers.transitions import (
    MAX_CONFLICT_RETRIES,
    deadline_send,
    lost_follow_ups,
    new_run_id,
    start_sends,
    user_message,
)
from schemas import AssistantPost
from schemas.names import poison_queue_name
from worker.loop.errors import ChatNotFound, PermanentError, TransientError
from worker.loop.handling import HandlerResult, MessageContext
from worker.observability.tracing import run_traceparent
from worker.runs import machine
from worker.runs.model import Run, StreamProgress
from worker.store.layout import AppliedRequest, ChatState
from worker.store.protocol import ChatStore, Conflict


def check_names(post: AssistantPost, services: RunServices) -> None:
    """replyTo and aiConnectionName may only name what the operator allowed."""
    settings = services.settings
    own = {q for queue in settings.work_queues for q in (queue, poison_queue_name(queue))}
    if post.reply_to in own:
        raise PermanentError(
            f"replyTo {post.reply_to!r} is one of the worker's own queues; name a queue of yours",
            error_type="ReplyToNotAllowed",
        )
    if post.ai_connection_name and post.ai_connection_name not in settings.ai_connections:
        raise PermanentError(
            f"aiConnectionName {post.ai_connection_name!r} is not allowed: list it in "
            "WORKER_AI_CONNECTIONS (with its __endpoint) or leave it out",
            error_type="ConnectionNotAllowed",
        )


def run_parameters(post: AssistantPost, defaults: dict[str, Any]) -> dict[str, Any]:
    """The run's sampling and tool settings: the post's, else the assistant's defaults."""

    def pick(name: str, value: Any) -> Any:
        return value if value is not None else defaults.get(name)

    params = {
        "temperature": pick("temperature", post.temperature),
        "topP": pick("topP", post.top_p),
        "maxTokens": pick("maxTokens", post.max_tokens),
        "reasoningEffort": pick("reasoningEffort", post.reasoning_effort),
        "isReasoningModel": post.is_reasoning_model,
        "toolChoice": post.tool_choice,
        "instructions": post.instructions,
        "aiConnectionName": post.ai_connection_name,
    }
    return {key: value for key, value in params.items() if value is not None}


class PostHandler:
    """Records the run and starts it when the chat has no active run."""

    def __init__(self, services: RunServices) -> None:
        self._services = services

    async def __call__(self, post: AssistantPost, context: MessageContext) -> HandlerResult:
        services = self._services
        check_names(post, services)
        chat = ChatRef(post.id, post.chat_storage_connection_setting, post.collection_name)
        store = await services.store(chat)
        for attempt in range(MAX_CONFLICT_RETRIES):
            state = await store.load_state(post.id)
            if state is None or not state.exists:
                # Perhaps not yet: the create may be right behind it on the queue.
                raise ChatNotFound(
                    f"assistant {post.id!r} does not exist in table {post.collection_name!r}: "
                    "send an assistantCreate first"
                )
            if context.give_up is not None:
                # Delivered too often (the crash guard): only the chat's absence, read above,
                # may explain that; the post itself is not run again.
                raise PermanentError(context.give_up, error_type="MaxDequeueCountExceeded")
            if attempt > 0 or context.dequeue_count > 1:
                # A first delivery's first try skips this read: its commit creates the
                # applied record, and fails (a conflict) if the record is there already.
                applied, run_id = await store.applied_run(post.id, context.request_id)
                if applied:
                    return await self._resume(store, chat, state, run_id, context)
            now = services.clock()
            run = self._new_run(post, state, context, now)
            starts = state.active_run_id is None
            messages = []
            if starts:
                # This post carries its run: its first steps are taken in-process, and a
                # redelivery of it continues the run if this worker dies meanwhile.
                run = replace(
                    machine.start(run, now, services.settings.run_timeout),
                    carrier=context.message_id,
                )
                messages.append(user_message(run, state.total_messages + 1, now))
            changed = replace(
                state,
                next_run_seq=state.next_run_seq + 1,
                total_messages=state.total_messages + len(messages),
                last_updated_at=now,
                active_run_id=run.run_id if starts else state.active_run_id,
            )
            applied_record = AppliedRequest(
                context.request_id, post.type, context.message_id, now, run_id=run.run_id
            )
            try:
                await store.commit(
                    changed, runs=[(run, True)], messages=messages, applied=applied_record
                )
            except Conflict:
                # Another post or step changed the chat: read it again and decide again.
                await asyncio.sleep(random.uniform(0, 0.02 * (attempt + 1)))
                continue
            effects = start_sends(services, chat, run, in_process=True) if starts else ()
            return HandlerResult(
                note="run started" if starts else "run queued",
                effects=effects,
                log_fields={"run_id": run.run_id},
            )
        raise TransientError(f"the chat {post.id!r} kept changing; retrying the post later")

    def _new_run(
        self, post: AssistantPost, state: ChatState, context: MessageContext, now: datetime
    ) -> Run:
        settings = self._services.settings
        defaults = state.defaults
        api = str(post.api or defaults.get("api") or settings.model_api)
        wanted = post.stream if post.stream is not None else bool(defaults.get("stream"))
        streams = self._services.streams
        # Streaming needs somewhere to stream to: the replyTo queue, or Redis.
        wanted = wanted and streams is not None and streams.can_stream(post.reply_to)
        return Run(
            run_id=new_run_id(state.next_run_seq),
            seq=state.next_run_seq,
            status="queued",
            request_id=context.request_id,
            user_message=post.user_message,
            api=api,
            model=post.chat_model or str(defaults.get("chatModel") or settings.chat_model),
            created_at=now,
            expires_at=now + timedelta(seconds=settings.run_timeout),
            params=run_parameters(post, defaults),
            reply_to=post.reply_to,
            traceparent=run_traceparent(post.traceparent),
            # The legacy Assistants API does not stream: its runs answer with the reply alone.
            stream=StreamProgress() if wanted and api in STREAMING_APIS else None,
        )

    async def _resume(
        self,
        store: ChatStore,
        chat: ChatRef,
        state: ChatState,
        run_id: str | None,
        context: MessageContext,
    ) -> HandlerResult:
        """A redelivered post (or a first delivery that lost its own commit's answer): make
        sure its run is not stuck. The run this post carries (a worker took its steps
        in-process and died) continues from where it was stored; an active run gets its
        watchdog again, and at step 0 its first step (it may not have been sent before a
        crash), or, waiting for producers, the events that say what it waits for. A duplicate
        step, watchdog or event is harmless, a missing one would stall the run."""
        if run_id is None:
            return HandlerResult(note="duplicate")
        run = await store.load_run(chat.chat_id, run_id)
        if run is None:
            return HandlerResult(note="duplicate")
        if run.carrier and run.carrier == context.message_id and context.dequeue_count > 1:
            effects = await lost_follow_ups(
                self._services, store, chat, run, state, in_process=True
            )
            return HandlerResult(note="duplicate: its run continues", effects=effects)
        if state.active_run_id != run_id or run.finished:
            return HandlerResult(note="duplicate")
        # The run is active: its watchdog again (a duplicate is harmless, a lost one would
        # leave the run active for ever), and at step 0 its first step too. A run that waits
        # for producers gets its events again: this post's worker may have died (or failed to
        # send) between them, and a submit stored since then has cleared the run's carrier.
        if run.phase == "external":
            # What the step that parked the run sent: its watchdog and events.
            effects = await lost_follow_ups(self._services, store, chat, run, state)
            return HandlerResult(note="duplicate: its run waits", effects=effects)
        if run.step != 0:
            return HandlerResult(
                note="duplicate", effects=(deadline_send(self._services, chat, run),)
            )
        return HandlerResult(note="duplicate", effects=start_sends(self._services, chat, run))

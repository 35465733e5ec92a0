"""The chaos soak's producer process: sends creates and posts, answers external tool calls.

``python -m bench.chaos_producer CONFIG.json`` (started by ``bench.chaos``). It sends every
chat's create and first post back to back (some in sequence, some at the same instant), then
the other posts at the configured rate; posts to a *strict* chat are sent one after another,
each once the reply of the one before has arrived. It reads the reply queues and answers each
``toolCallsRequired`` event with ``submitToolOutputs`` in the post's mode: ``whole`` (one
submit), ``twice`` (the same submit, same requestId, sent twice), ``partial`` (one call per
submit, one after another), ``concurrent`` (one call per submit, all sent at once) or
``repeat`` (partial, each submit repeating the outputs already sent). It decides each
``toolApprovalRequired`` event with ``submitToolApprovals`` (approve or deny each call as
``bench.chaos_model.approves`` says) in the post's approval mode: ``whole``, ``twice``,
``split`` (one call per request, one after another), ``concurrent`` (one call per request, all
at once) or ``conflict`` (a second approver sends the opposite decisions at the same instant:
the first stored stands). Everything it sends and receives is appended to the journal (JSON
lines); a status file says how far it got. It stops on SIGTERM/SIGINT or at its deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from bench.chaos_model import approves, denial_reason, user_message

STATUS_INTERVAL = 0.5
RECEIVE_IDLE = 0.2
PARTIAL_PAUSE = 0.3
USER_AGENT = "chaos-producer"


def decode(body: str) -> dict[str, Any] | None:
    text = body.strip()
    if not text.startswith("{"):
        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            text = base64.b64decode(text, validate=True).decode("utf-8")
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


@dataclass
class Producer:
    config: dict[str, Any]
    service: QueueServiceClient
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent_posts: int = 0
    sent_creates: int = 0
    submits: int = 0
    send_errors: int = 0
    schedule_done: bool = False
    done_sending: bool = False
    replied: set[str] = field(default_factory=set)
    reply_waiters: dict[str, asyncio.Event] = field(default_factory=dict)
    handled_events: int = 0
    decisions: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Closed by produce() when the producer stops.
        self.journal = Path(self.config["journal"]).open("a", buffering=1)  # noqa: SIM115
        self.chats = {chat["id"]: chat for chat in self.config["chats"]}
        self.modes = {
            post["tag"]: post["mode"] for chat in self.config["chats"] for post in chat["posts"]
        }
        self.approval_modes = {
            post["tag"]: post.get("approval_mode", "whole")
            for chat in self.config["chats"]
            for post in chat["posts"]
        }
        self.total_posts = sum(len(chat["posts"]) for chat in self.config["chats"])
        self.requests = self.service.get_queue_client(self.config["requests_queue"])

    def log(self, **entry: Any) -> None:
        entry["t"] = time.time()
        self.journal.write(json.dumps(entry) + "\n")

    # -- sending ---------------------------------------------------------------------

    async def send(self, body: dict[str, Any], what: str) -> None:
        """Send one request; retried (bounded) on storage errors, as a producer would."""
        text = json.dumps(body)
        for attempt in range(20):
            try:
                sent = await self.requests.send_message(text)
            except AzureError as error:
                self.send_errors += 1
                self.log(kind="send_error", what=what, error=f"{type(error).__name__}: {error}")
                if self.stop.is_set():
                    return
                await asyncio.sleep(min(0.2 * 2**attempt, 3))
                continue
            self.log(
                kind="send",
                what=what,
                chat=body.get("id"),
                requestId=body.get("requestId"),
                messageId=sent.id,
                insertedOn=sent.inserted_on.isoformat() if sent.inserted_on else None,
            )
            return
        self.log(kind="send_failed", what=what, requestId=body.get("requestId"))

    def create_body(self, chat: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "assistantCreate",
            "id": chat["id"],
            "requestId": f"create-{chat['id']}",
            "collectionName": self.config["table"],
            "instructions": f"You are chaos assistant {chat['id']}.",
            "api": chat["api"],
            "tools": chat["tools"],
            **({"mcpServers": chat["mcp_servers"]} if chat.get("mcp_servers") else {}),
            "approvalRequired": chat.get("approval_required"),
        }

    def post_body(self, chat: dict[str, Any], post: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "assistantPost",
            "id": chat["id"],
            "requestId": post["requestId"],
            "collectionName": self.config["table"],
            "userMessage": user_message(post["tag"], post["plan"]),
            "replyTo": chat["reply_queue"],
            "stream": bool(chat.get("stream")),
        }

    async def send_post(self, chat: dict[str, Any], index: int) -> None:
        post = chat["posts"][index]
        self.reply_waiters.setdefault(post["requestId"], asyncio.Event())
        await self.send(self.post_body(chat, post), "post")
        self.sent_posts += 1

    async def start_chat(self, chat: dict[str, Any]) -> None:
        """The create and the first post back to back: in order, or both at once."""
        if chat["together"]:
            await asyncio.gather(
                self.send(self.create_body(chat), "create"), self.send_post(chat, 0)
            )
        else:
            await self.send(self.create_body(chat), "create")
            await self.send_post(chat, 0)
        self.sent_creates += 1

    async def strict_chat(self, chat: dict[str, Any]) -> None:
        """Posts one after another: the next once the reply of the one before arrived."""
        for index in range(1, len(chat["posts"])):
            before = chat["posts"][index - 1]["requestId"]
            waiter = self.reply_waiters.setdefault(before, asyncio.Event())
            waited = asyncio.ensure_future(waiter.wait())
            stopped = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({waited, stopped}, return_when=asyncio.FIRST_COMPLETED)
            waited.cancel()
            stopped.cancel()
            if self.stop.is_set():
                return
            await self.send_post(chat, index)

    async def backpressure(self) -> None:
        """Wait while ``max_outstanding`` posts sent have no final reply yet (the soak checks
        correctness under faults, not capacity: a backlog past the run timeout would only
        measure the machine)."""
        limit = int(self.config.get("max_outstanding") or 0)
        while limit and self.sent_posts - len(self.replied) >= limit and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.1)

    async def sender(self) -> None:
        """Walk the schedule at the configured rate (posts per second)."""
        interval = 1.0 / float(self.config["rate"])
        began = time.monotonic()
        waited = 0.0
        strict: list[asyncio.Task[None]] = []
        for number, (chat_id, index) in enumerate(self.config["schedule"]):
            if self.stop.is_set():
                break
            due = began + waited + number * interval
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                if self.stop.is_set():
                    break
            paused = time.monotonic()
            await self.backpressure()
            waited += time.monotonic() - paused
            if self.stop.is_set():
                break
            chat = self.chats[chat_id]
            if index == 0:
                await self.start_chat(chat)
                if chat["strict"]:
                    strict.append(asyncio.create_task(self.strict_chat(chat)))
            else:
                await self.send_post(chat, index)
        self.schedule_done = True
        self.log(kind="schedule_done", posts=self.sent_posts)
        pending: set[asyncio.Future[Any]] = set(strict)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        while pending and not self.stop.is_set():
            _, pending = await asyncio.wait(
                {stopped, *pending}, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(stopped)
        stopped.cancel()
        for task in pending:
            task.cancel()  # stopped: the strict chats give up
        self.done_sending = not pending
        self.log(kind="done_sending", posts=self.sent_posts)

    # -- replies ---------------------------------------------------------------------

    async def reader(self, queue: QueueClient) -> None:
        while not self.stop.is_set():
            try:
                messages = [
                    m
                    async for m in queue.receive_messages(
                        messages_per_page=32, max_messages=32, visibility_timeout=30
                    )
                ]
            except AzureError as error:
                self.log(kind="receive_error", queue=queue.queue_name, error=str(error)[:300])
                messages = []
            if not messages:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), RECEIVE_IDLE)
                continue
            for message in messages:
                body = decode(str(message.content))
                self.log(
                    kind="event",
                    queue=queue.queue_name,
                    messageId=message.id,
                    dequeueCount=message.dequeue_count,
                    body=body if body is not None else str(message.content)[:2000],
                )
                if body is not None:
                    self.handle(body)
                with contextlib.suppress(AzureError):
                    await queue.delete_message(message)

    def handle(self, event: dict[str, Any]) -> None:
        self.handled_events += 1
        if event.get("type") == "assistantReply":
            request_id = str(event.get("requestId"))
            if event.get("status") in ("completed", "failed", "cancelled", "expired", "incomplete"):
                self.replied.add(request_id)
                self.reply_waiters.setdefault(request_id, asyncio.Event()).set()
        elif event.get("type") in ("toolCallsRequired", "toolApprovalRequired"):
            answer = self.answer if event["type"] == "toolCallsRequired" else self.decide
            task = asyncio.create_task(answer(event))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def answer(self, event: dict[str, Any]) -> None:
        chat_id, run_id = str(event.get("id")), str(event.get("runId"))
        calls: list[dict[str, Any]] = list(event.get("toolCalls") or [])
        if not calls:
            return
        outputs: list[tuple[str, str]] = []
        tags: list[str] = []
        for call in calls:
            try:
                tag = str(json.loads(call.get("arguments") or "{}").get("tag"))
            except (ValueError, AttributeError):
                tag = "?"
            tags.append(tag)
            outputs.append((str(call.get("id")), f"ext {tag}"))
        post_tag = tags[0].split(".r")[0]
        mode = self.modes.get(post_tag, "whole")
        if len(outputs) == 1 and mode in ("partial", "concurrent", "repeat"):
            mode = "whole"
        table = self.config["table"]

        def body(pairs: Sequence[tuple[str, str]], request_id: str) -> dict[str, Any]:
            return {
                "type": "submitToolOutputs",
                "id": chat_id,
                "runId": run_id,
                "collectionName": table,
                "requestId": request_id,
                "toolOutputs": [{"toolCallId": cid, "output": out} for cid, out in pairs],
            }

        ids = [cid for cid, _ in outputs]
        self.log(kind="answer", chat=chat_id, runId=run_id, mode=mode, calls=ids, tags=tags)
        if mode in ("whole", "twice"):
            whole = body(outputs, f"sub-{run_id}-{short_hash(*ids)}")
            await self.send(whole, "submit")
            self.submits += 1
            if mode == "twice":
                await self.send(whole, "submit-again")
                self.submits += 1
        elif mode == "concurrent":
            await asyncio.gather(
                *(self.send(body([pair], f"sub-{run_id}-{pair[0]}"), "submit") for pair in outputs)
            )
            self.submits += len(outputs)
        else:  # partial, repeat
            for number in range(len(outputs)):
                pairs = outputs[: number + 1] if mode == "repeat" else [outputs[number]]
                request_id = f"sub-{run_id}-{mode}{number}-{short_hash(*ids)}"
                await self.send(body(pairs, request_id), "submit")
                self.submits += 1
                if number < len(outputs) - 1:
                    await asyncio.sleep(PARTIAL_PAUSE)

    async def decide(self, event: dict[str, Any]) -> None:
        """Approve or deny each call of a toolApprovalRequired event, in the post's mode."""
        chat_id, run_id = str(event.get("id")), str(event.get("runId"))
        decisions: list[dict[str, Any]] = []
        tags: list[str] = []
        for call in event.get("toolCalls") or []:
            try:
                tag = str(json.loads(call.get("arguments") or "{}").get("tag"))
            except (ValueError, AttributeError):
                tag = "?"
            tags.append(tag)
            approve = approves(tag)
            decision = {"toolCallId": str(call.get("id")), "approve": approve, "by": "chaos-a"}
            if not approve:
                decision["reason"] = denial_reason(tag)
            decisions.append(decision)
        if not decisions:
            return
        mode = self.approval_modes.get(tags[0].split(".r")[0], "whole")
        if len(decisions) == 1 and mode in ("split", "concurrent"):
            mode = "whole"
        table = self.config["table"]
        ids = [d["toolCallId"] for d in decisions]

        def body(chosen: Sequence[dict[str, Any]], request_id: str) -> dict[str, Any]:
            return {
                "type": "submitToolApprovals",
                "id": chat_id,
                "runId": run_id,
                "collectionName": table,
                "requestId": request_id,
                "approvals": list(chosen),
            }

        self.log(kind="decide", chat=chat_id, runId=run_id, mode=mode, calls=ids, tags=tags,
                 approve=[d["approve"] for d in decisions])  # fmt: skip
        whole = body(decisions, f"dec-{run_id}-{short_hash(*ids)}")
        if mode in ("whole", "twice"):
            await self.send(whole, "decide")
            if mode == "twice":
                await self.send(whole, "decide-again")
        elif mode == "conflict":
            other = [
                {**d, "approve": not d["approve"], "by": "chaos-b", "reason": "second opinion"}
                for d in decisions
            ]
            await asyncio.gather(
                self.send(whole, "decide"),
                self.send(body(other, f"dec-b-{run_id}-{short_hash(*ids)}"), "decide-conflict"),
            )
        elif mode == "concurrent":
            await asyncio.gather(
                *(self.send(body([d], f"dec-{run_id}-{d['toolCallId']}"), "decide")
                  for d in decisions)
            )  # fmt: skip
        else:  # split
            for number, decision in enumerate(decisions):
                await self.send(
                    body([decision], f"dec-{run_id}-{decision['toolCallId']}"), "decide"
                )
                if number < len(decisions) - 1:
                    await asyncio.sleep(PARTIAL_PAUSE)
        self.decisions += 1

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "t": time.time(),
            "posts_total": self.total_posts,
            "sent_posts": self.sent_posts,
            "sent_creates": self.sent_creates,
            "schedule_done": self.schedule_done,
            "done_sending": self.done_sending,
            "replied": len(self.replied),
            "submits": self.submits,
            "decisions": self.decisions,
            "send_errors": self.send_errors,
            "events": self.handled_events,
        }

    async def reporter(self) -> None:
        path = Path(self.config["status"])
        while True:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status()))
            tmp.replace(path)
            if self.stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), STATUS_INTERVAL)


async def produce(config: dict[str, Any]) -> None:
    async with QueueServiceClient.from_connection_string(
        config["connection_string"],
        initial_backoff=0.5,
        increment_base=1,
        retry_total=3,
        connection_timeout=5,
        read_timeout=15,
        user_agent=USER_AGENT,
    ) as service:
        producer = Producer(config, service)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, producer.stop.set)
        queues = [service.get_queue_client(name) for name in config["reply_queues"]]
        for queue in [producer.requests, *queues]:
            with contextlib.suppress(ResourceExistsError):
                await queue.create_queue()
        deadline = float(config["deadline"]) - time.time()
        loop.call_later(max(deadline, 0), producer.stop.set)
        workers = [
            asyncio.create_task(producer.sender()),
            asyncio.create_task(producer.reporter()),
            *(asyncio.create_task(producer.reader(q)) for q in queues),
        ]
        await producer.stop.wait()
        for task in [*workers, *producer.tasks]:
            if task is not workers[1]:
                task.cancel()
        await asyncio.gather(*workers, *producer.tasks, return_exceptions=True)
        producer.log(kind="stopped", **producer.status())
        producer.journal.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.chaos_producer CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(args[0]).read_text())
    asyncio.run(produce(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

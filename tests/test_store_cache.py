"""What a store remembers of a chat (``worker.store.cache``), on Azurite: a step reads only
the messages it has not seen, and a stale memory — another worker appended, reset the chat, or
committed meanwhile — never yields a wrong history or a lost write.

Two ``ChatStores`` on the same table play two worker processes; each counts its own table
requests with the counting transport the worker's metrics use.
"""

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta

from handlers.step import StepHandler
from tests.support.env import StorageEnv, run
from tests.support.runs import services_on
from tests.test_store import NOW, applied, fresh_state, system
from worker.connections.clients import table_service
from worker.runs.model import Run
from worker.store.cache import ChatMemory, CommittedCache
from worker.store.layout import ChatMessage, ChatState
from worker.store.protocol import Conflict
from worker.store.stores import ChatStores
from worker.store.tables import TableChatStore

CHAT = "cache-chat"


class CountedStore:
    """One process's view of the table, with the requests it made."""

    def __init__(self, store: TableChatStore, requests: Counter[str]) -> None:
        self.store = store
        self.requests = requests

    def made(self) -> int:
        """Table requests since the last call."""
        count = sum(self.requests.values())
        self.requests.clear()
        return count


@asynccontextmanager
async def process_view(storage: StorageEnv) -> AsyncIterator[CountedStore]:
    requests: Counter[str] = Counter()

    def observe(_service: str, method: str, _status: str) -> None:
        requests[method] += 1

    stores = ChatStores(storage.settings(), lambda c: table_service(c, observe))
    try:
        store = await stores.get("AzureWebJobsStorage", storage.table, create=True)
        view = CountedStore(store, requests)
        view.made()
        yield view
    finally:
        await stores.close()


def said(index: int, text: str, run_id: str = "run-a") -> ChatMessage:
    return ChatMessage(index, "User", text, fresh_state(CHAT).created_at, run_id=run_id)


async def append(store: TableChatStore, *texts: str) -> ChatState:
    """Commit messages after the chat's last one, as a post or step would."""
    state = await store.load_state(CHAT)
    assert state is not None
    first = state.total_messages + 1
    messages = [said(first + i, text) for i, text in enumerate(texts)]
    changed = replace(state, total_messages=state.total_messages + len(texts))
    await store.commit(changed, messages=messages)
    fresh = await store.load_state(CHAT)
    assert fresh is not None
    return fresh


def contents(messages: list[ChatMessage]) -> list[str]:
    return [m.content for m in messages]


def test_a_step_reads_only_the_messages_it_has_not_seen(storage: StorageEnv) -> None:
    async def scenario() -> None:
        async with process_view(storage) as one, process_view(storage) as other:
            assert await one.store.reset_chat(fresh_state(CHAT), system(), applied("c1"))
            state = await append(one.store, "a", "b")
            one.made()
            assert contents(await one.store.history(state)) == ["be brief", "a", "b"]
            assert one.made() == 0, "its own commits are in memory"

            # Another worker appends: this one reads just those rows, with one request.
            state = await append(other.store, "c", "d")
            assert contents(await one.store.history(state)) == ["be brief", "a", "b", "c", "d"]
            assert one.made() == 1
            assert contents(await one.store.history(state)) == ["be brief", "a", "b", "c", "d"]
            assert one.made() == 0

            # An older state (read before the last commit) gets the messages it counts.
            older = replace(state, total_messages=3)
            assert contents(await one.store.history(older)) == ["be brief", "a", "b"]

    run(scenario())


def test_a_reset_by_another_worker_is_not_hidden_by_the_cache(storage: StorageEnv) -> None:
    async def scenario() -> None:
        async with process_view(storage) as one, process_view(storage) as other:
            assert await one.store.reset_chat(fresh_state(CHAT), system(), applied("c1"))
            state = await append(one.store, "old 1", "old 2")
            assert contents(await one.store.history(state)) == ["be brief", "old 1", "old 2"]

            # The other worker resets the chat (a new CreatedAt) and posts as many messages:
            # the same TotalMessages, other rows.
            later = fresh_state(CHAT, created_at=state.created_at + timedelta(seconds=5))
            assert await other.store.reset_chat(later, system("be kind"), applied("c2"))
            state = await append(other.store, "new 1", "new 2")
            assert state.total_messages == 3

            assert contents(await one.store.history(state)) == ["be kind", "new 1", "new 2"]

    run(scenario())


def test_a_stale_copy_of_the_last_commit_cannot_overwrite_a_newer_one(
    storage: StorageEnv,
) -> None:
    """The state an in-process step starts from is this process's last commit; if another
    worker wrote since, the step's commit fails its ETag check (and the caller reads again)."""

    async def scenario() -> None:
        async with process_view(storage) as one, process_view(storage) as other:
            assert await one.store.reset_chat(fresh_state(CHAT), system(), applied("c1"))
            state = await one.store.load_state(CHAT)
            assert state is not None
            run_row = sample_run()
            await one.store.commit(
                replace(state, active_run_id=run_row.run_id, next_run_seq=2),
                runs=[(run_row, True)],
            )
            remembered = one.store.committed(CHAT, run_row.run_id)
            assert remembered is not None
            kept_state, kept_run = remembered.state, remembered.run
            assert kept_state.active_run_id == run_row.run_id and kept_run.etag
            assert one.store.committed(CHAT, run_row.run_id) is None, "taken once"

            # Unchanged since: a commit from the remembered copy lands without a read.
            one.made()
            await one.store.commit(
                replace(kept_state, total_messages=2),
                runs=[(replace(kept_run, step=1), False)],
                messages=[said(2, "hello", run_row.run_id)],
            )
            assert one.made() == 1
            newest = one.store.committed(CHAT, run_row.run_id)
            assert newest is not None

            # Another worker commits: the remembered copy is stale and its commit refused.
            fresh = await other.store.load_state(CHAT)
            assert fresh is not None
            await other.store.commit(replace(fresh, next_run_seq=3))
            stale_state, stale_run = newest.state, newest.run
            try:
                await one.store.commit(
                    replace(stale_state, total_messages=3),
                    runs=[(replace(stale_run, step=2), False)],
                    messages=[said(3, "lost?", run_row.run_id)],
                )
            except Conflict:
                pass
            else:
                raise AssertionError("a commit from a stale copy must conflict")
            final = await other.store.load_state(CHAT)
            assert final is not None and final.total_messages == 2 and final.next_run_seq == 3

    run(scenario())


def step_handler(store: TableChatStore, storage: StorageEnv) -> StepHandler:
    """The runStep handler on ``store``, with no model (a step that acts fails its run: its
    note then says so, where a dropped step says "stale") and the clock at ``NOW``."""
    return StepHandler(services_on(store, storage.settings(), lambda: NOW))


def sample_run() -> Run:
    created = fresh_state(CHAT).created_at
    return Run(
        run_id="run_000001_cafe",
        seq=1,
        status="in_progress",
        request_id="p1",
        user_message="hello",
        api="chat",
        model="m",
        created_at=created,
        expires_at=created + timedelta(minutes=10),
    )


def test_a_step_is_never_dropped_on_a_stale_copy(storage: StorageEnv) -> None:
    """The defect the chaos soak found: a worker queued a post (its copy of the chat: run 1
    active, run 2 queued); another worker ended run 1 and started run 2; run 2's first step
    came to the first worker, whose copy said "not the active run" — and dropped the step,
    leaving the run to its deadline. A copy may make a step act, never drop it."""
    from schemas import RunStep
    from tests.test_store import make_run
    from worker.loop.handling import MessageContext
    from worker.runs import machine

    async def scenario() -> str:
        async with process_view(storage) as one, process_view(storage) as other:
            assert await one.store.reset_chat(fresh_state(CHAT), system(), applied("c1"))
            first, second = make_run(1, "in_progress"), make_run(2, "queued")
            state = await one.store.load_state(CHAT)
            assert state is not None
            active = replace(state, active_run_id=first.run_id, next_run_seq=2)
            await one.store.commit(active, runs=[(first, True)])
            state = await one.store.load_state(CHAT)
            assert state is not None
            # This worker queues the post of run 2 (and keeps its copy of that commit).
            await one.store.commit(replace(state, next_run_seq=3), runs=[(second, True)])

            # The other worker ends run 1 and starts run 2.
            fresh = await other.store.load_state(CHAT)
            runs = {r.run_id: r for r in await other.store.runs(CHAT)}
            assert fresh is not None
            ended = replace(runs[first.run_id], status="completed")
            started = machine.start(runs[second.run_id], NOW, 300)
            await other.store.commit(
                replace(fresh, active_run_id=second.run_id),
                runs=[(ended, False), (replace(started, etag=runs[second.run_id].etag), False)],
            )

            step = RunStep(id=CHAT, run_id=second.run_id, step=0, collection_name=storage.table)
            context = MessageContext(
                queue="runs", message_id="m-step", dequeue_count=1, request_id="m-step"
            )
            result = await step_handler(one.store, storage)(step, context)
            return result.note

    note = run(scenario())
    assert not note.startswith("stale"), note
    assert note == "model -> failed"


def test_a_redelivered_step_resends_what_its_first_delivery_lost(storage: StorageEnv) -> None:
    """The defect the full soak found: this worker stored a run's step (its copy: the run at
    step 1, active); another worker took the next delivery of step 1, completed the run and
    died before sending the reply; the redelivery came here. On its copy it polled again, lost
    the commit race, and dropped the step: no reply ever. A redelivery reads the table, sees
    the run completed by the delivery before it, and sends the reply."""
    from schemas import RunStep
    from tests.test_store import make_run
    from worker.loop.handling import MessageContext

    async def scenario() -> list[dict[str, object]]:
        async with process_view(storage) as one, process_view(storage) as other:
            assert await one.store.reset_chat(fresh_state(CHAT), system(), applied("c1"))
            run_row = replace(make_run(1, "in_progress"), step=1, phase="poll", reply_to="rq")
            state = await one.store.load_state(CHAT)
            assert state is not None
            await one.store.commit(
                replace(state, active_run_id=run_row.run_id, next_run_seq=2, total_messages=2),
                runs=[(run_row, True)],
                messages=[said(2, "question 1", run_row.run_id)],
            )
            # The other worker completes the run from delivery "m-poll" and dies.
            fresh = await other.store.load_state(CHAT)
            current = await other.store.load_run(CHAT, run_row.run_id)
            assert fresh is not None and current is not None
            answer = ChatMessage(3, "Assistant", "the answer", NOW, run_id=run_row.run_id)
            done = replace(current, status="completed", step=2, carrier="m-poll")
            await other.store.commit(
                replace(fresh, active_run_id=None, total_messages=3),
                runs=[(done, False)],
                messages=[answer],
            )

            step = RunStep(id=CHAT, run_id=run_row.run_id, step=1, collection_name=storage.table)
            context = MessageContext(
                queue="runs", message_id="m-poll", dequeue_count=2, request_id="m-poll"
            )
            result = await step_handler(one.store, storage)(step, context)
            return [send.payload for send in result.effects if send.queue == "rq"]

    [reply] = run(scenario())
    assert reply["status"] == "completed" and reply["content"] == "the answer", reply


def test_a_peek_at_the_last_commit_leaves_it_for_the_step() -> None:
    """A reader that only acts on a waiting run (a decision) peeks at the last commit; the
    step taken right after that commit still finds it, with the claims it holds, once."""
    cache = CommittedCache(ChatMemory(), "ChatState")
    run_ = Run(
        run_id="run-a", seq=1, status="requires_action", request_id="r", user_message="hi",
        api="chat", model="m", created_at=NOW, expires_at=NOW + timedelta(minutes=5),
    )  # fmt: skip
    cache.put(fresh_state(CHAT), {"run-a": run_}, {"tool-x": "etag-1"})
    peeked = cache.peek(CHAT, "run-a")
    assert peeked is not None and peeked.run == run_ and peeked.claims == {"tool-x": "etag-1"}
    assert cache.peek(CHAT, "run-b") is None
    taken = cache.take(CHAT, "run-a")
    assert taken is not None and taken.claims == {"tool-x": "etag-1"}
    assert cache.take(CHAT, "run-a") is None and cache.peek(CHAT, "run-a") is None

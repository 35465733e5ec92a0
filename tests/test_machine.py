"""The run state machine: pure transitions (no I/O)."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from worker.runs import machine
from worker.runs.model import ModelTurn, Pending, PendingCall, Run, ToolCallRef, Usage

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def a_run(**changes: object) -> Run:
    run = Run(
        run_id="run_000001_abc",
        seq=1,
        status="in_progress",
        request_id="r",
        user_message="hi",
        api="chat",
        model="m",
        created_at=NOW,
        expires_at=NOW + timedelta(seconds=600),
    )
    return replace(run, **changes)  # type: ignore[arg-type]


CALLS = (ToolCallRef("c1", "weather", "{}"), ToolCallRef("c2", "lookup", "{}"))


class TestModelTurns:
    def test_an_answer_completes_the_run(self) -> None:
        """Text without tool calls ends the run completed, with one Assistant message."""
        t = machine.on_turn(a_run(), ModelTurn("Sunny.", usage=Usage(3, 2, 5)), NOW,
                            max_rounds=10, external_tools=set())  # fmt: skip
        assert t.run.status == "completed"
        assert t.run.content == "Sunny."
        assert t.run.usage == Usage(3, 2, 5)
        assert [m.role for m in t.messages] == ["Assistant"]
        assert t.next_step_delay is None
        assert t.last_total_tokens == 5

    def test_a_cut_short_answer_ends_incomplete(self) -> None:
        """An answer stopped by the token limit is stored, and the run says it is incomplete."""
        turn = ModelTurn("Sun", incomplete="the token limit was reached")
        t = machine.on_turn(a_run(), turn, NOW, max_rounds=10, external_tools=set())
        assert t.run.status == "incomplete"
        assert "token limit" in (t.run.error or "")

    def test_local_tool_calls_are_run_next(self) -> None:
        """Tool calls are recorded on the Assistant message and run by the next step."""
        t = machine.on_turn(
            a_run(), ModelTurn(None, CALLS), NOW, max_rounds=10, external_tools=set()
        )
        assert t.run.phase == "tools"
        assert t.run.step == 1
        assert t.run.tool_rounds == 1
        assert [c.id for c in t.run.pending_calls] == ["c1", "c2"]
        assert '"functionName":"weather"' in t.messages[0].tool_calls
        assert t.next_step_delay == 0.0

    def test_external_only_calls_wait_for_the_producer_until_the_deadline(self) -> None:
        """External calls put the run in requires_action and announce them; no step is sent
        (the run's deadline message ends it if no output comes)."""
        t = machine.on_turn(a_run(), ModelTurn(None, CALLS), NOW, max_rounds=10,
                            external_tools={"weather", "lookup"})  # fmt: skip
        assert t.run.status == "requires_action"
        assert t.run.phase == "external"
        assert t.announce_tool_calls
        assert t.next_step_delay is None

    def test_the_round_cap_answers_every_call_and_forces_a_final_answer(self) -> None:
        """At the cap each open call gets an error result and the next call has no tools."""
        t = machine.on_turn(a_run(tool_rounds=10), ModelTurn(None, CALLS), NOW, max_rounds=10,
                            external_tools=set())  # fmt: skip
        assert [m.role for m in t.messages] == ["Assistant", "Tool", "Tool"]
        assert {m.tool_call_id for m in t.messages[1:]} == {"c1", "c2"}
        assert t.run.force_final
        assert t.run.phase == "model"
        again = machine.on_turn(t.run, ModelTurn(None, CALLS), NOW, max_rounds=10,
                                external_tools=set())  # fmt: skip
        assert again.run.status == "incomplete"
        assert [m.role for m in again.messages] == ["Assistant", "Tool", "Tool"]


class TestToolResults:
    def test_results_resume_the_model(self) -> None:
        """When every call has a result the run goes back to the model."""
        run = a_run(phase="tools", step=1, pending_calls=(PendingCall("c1", "weather", "{}"),))
        t = machine.on_tool_results(run, [("c1", "70F")], NOW)
        assert t.run.phase == "model"
        assert t.run.pending_calls == ()
        assert [(m.role, m.tool_call_id, m.content) for m in t.messages] == [("Tool", "c1", "70F")]

    def test_external_calls_left_wait_for_the_producer(self) -> None:
        """Local results stored, the external call still open: requires_action."""
        pending = (
            PendingCall("c1", "weather", "{}"),
            PendingCall("c2", "lookup", "{}", external=True),
        )
        t = machine.on_tool_results(a_run(phase="tools", pending_calls=pending), [("c1", "x")], NOW)
        assert t.run.status == "requires_action"
        assert [c.id for c in t.run.pending_calls] == ["c2"]
        assert t.announce_tool_calls

    def test_outputs_are_checked_against_the_pending_calls(self) -> None:
        """Outputs for unknown ids, repeated ids, or a run not waiting are refused, saying why."""
        waiting = a_run(status="requires_action", phase="external",
                        pending_calls=(PendingCall("c2", "lookup", "{}", external=True),))  # fmt: skip
        assert machine.sort_outputs(waiting, ["c2"]) == (["c2"], None)
        assert "no pending tool call 'nope'" in (machine.sort_outputs(waiting, ["nope"])[1] or "")
        assert "more than once" in (machine.sort_outputs(waiting, ["c2", "c2"])[1] or "")
        done = a_run(status="completed")
        assert "is not waiting" in (machine.sort_outputs(done, ["c2"])[1] or "")

    def test_partial_outputs_accumulate_and_the_last_one_resumes(self) -> None:
        """Two producers answer one call each: the first leaves the run waiting, silently;
        the second resumes it; a repeat of an answered call is ignored, not refused."""
        pending = (
            PendingCall("a", "lookup", "{}", external=True),
            PendingCall("b", "price", "{}", external=True),
        )
        run = a_run(status="requires_action", phase="external", pending_calls=pending)
        first = machine.on_tool_results(run, [("a", "1")], NOW)
        assert first.run.status == "requires_action"
        assert first.run.answered_calls == ("a",)
        assert first.next_step_delay is None
        assert not first.announce_tool_calls
        assert machine.sort_outputs(first.run, ["a"]) == ([], None)
        assert machine.sort_outputs(first.run, ["a", "b"]) == (["b"], None)
        second = machine.on_tool_results(first.run, [("b", "2")], NOW)
        assert second.run.phase == "model"
        assert second.next_step_delay == 0.0
        # After the round resumed, a late repeat of an answered call is still only ignored.
        assert machine.sort_outputs(second.run, ["b"]) == ([], None)

    def test_missing_and_duplicate_call_ids_get_ids_of_their_own(self) -> None:
        """A server that sends no ids or one id twice must not make outputs overwrite each
        other: every call of the turn gets a distinct id."""
        turn = ModelTurn(
            None,
            (ToolCallRef("", "a", "{}"), ToolCallRef("x", "b", "{}"), ToolCallRef("x", "c", "{}")),
        )
        t = machine.on_turn(a_run(), turn, NOW, max_rounds=10, external_tools=())
        ids = [c.id for c in t.run.pending_calls]
        assert len(set(ids)) == 3
        assert ids[1] == "x"
        assert all(ids)


class TestPollingAndTime:
    def test_polls_follow_the_schedule_and_repeat_its_last_delay(self) -> None:
        """Each pending poll waits the next delay of the schedule."""
        run = a_run()
        delays = []
        for _ in range(4):
            t = machine.on_pending(run, Pending({"responseId": "r1"}), NOW, (0.5, 1.0, 2.0))
            delays.append(t.next_step_delay)
            run = t.run
        assert delays == [0.5, 1.0, 2.0, 2.0]
        assert run.handle == {"responseId": "r1"}
        assert run.phase == "poll"

    def test_a_remote_run_that_ended_ends_the_run(self) -> None:
        """A background run that expired remotely ends ours with its status."""
        t = machine.on_pending(a_run(), Pending({}, ended="expired", error="late"), NOW, (1.0,))
        assert t.run.status == "expired"
        assert t.run.error == "late"

    def test_transient_failures_retry_the_same_work_later(self) -> None:
        """A 429 advances the step (older copies turn stale) and waits the given delay."""
        t = machine.on_transient(a_run(step=3), 7.0)
        assert t.run.step == 4
        assert t.run.transient_failures == 1
        assert t.next_step_delay == 7.0

    def test_expiry_answers_open_calls(self) -> None:
        """An expired run leaves no tool call without a result."""
        run = a_run(pending_calls=(PendingCall("c1", "weather", "{}"),))
        t = machine.expire(run, NOW, 600)
        assert t.run.status == "expired"
        assert [(m.role, m.tool_call_id) for m in t.messages] == [("Tool", "c1")]

    def test_the_deadline_is_due_just_after_the_run_expires(self) -> None:
        """The deadline message waits out the run's remaining time, plus a second."""
        run = a_run(status="requires_action", phase="external")
        assert machine.until_expiry(run, run.expires_at - timedelta(seconds=10)) == 11.0

    def test_deadlines_are_capped_at_what_a_queue_can_delay(self) -> None:
        """Azure delays a message at most 7 days."""
        run = a_run(expires_at=NOW + timedelta(days=30))
        assert machine.until_expiry(run, NOW) == machine.MAX_DELAY

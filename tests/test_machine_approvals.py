"""Approvals in the run state machine: pure transitions (no I/O), SPEC §5.5."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from worker.runs import machine
from worker.runs.approvals import ApprovalPolicy
from worker.runs.model import Decision, ModelTurn, Run, ToolCallRef

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)


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


EMAIL = ToolCallRef("c_mail", "send_email", '{"to":"a@b.c"}')
WEATHER = ToolCallRef("c_weather", "get_weather", '{"city":"Oslo"}')
LOOKUP = ToolCallRef("c_lookup", "lookup", '{"id":1}')
MCP_PAY = ToolCallRef("c_pay", "bank__pay", '{"amount":5}')

EMAIL_NEEDS_APPROVAL = ApprovalPolicy(names=frozenset({"send_email"}))


def turn(
    *calls: ToolCallRef, approvals: ApprovalPolicy = EMAIL_NEEDS_APPROVAL
) -> machine.Transition:
    return machine.on_turn(
        a_run(),
        ModelTurn(None, calls),
        NOW,
        max_rounds=10,
        external_tools={"lookup"},
        approvals=approvals,
    )


def yes(by: str = "ana", reason: str | None = None) -> Decision:
    return Decision(approve=True, at=LATER, reason=reason, by=by)


def no(reason: str | None = "not today", by: str = "bo") -> Decision:
    return Decision(approve=False, at=LATER, reason=reason, by=by)


class TestPolicy:
    def test_names_all_and_flagged_tools(self) -> None:
        """A tool needs approval when the assistant names it, says "all", or the tool is
        declared @tool(approval=True); names are compared as offered (MCP: server__tool)."""
        named = ApprovalPolicy.of({"approvalRequired": ["send_email", "bank__pay"]})
        assert named.needs("send_email") and named.needs("bank__pay")
        assert not named.needs("get_weather")
        assert ApprovalPolicy.of({"approvalRequired": "all"}).needs("anything")
        assert ApprovalPolicy.of({}, flagged=["wire_money"]).needs("wire_money")
        assert not ApprovalPolicy.of({}).needs("send_email")

    def test_the_server_of_an_mcp_tool(self) -> None:
        """``server__tool`` names of the assistant's mcpServers (names or objects) name their
        server; other names, and servers the assistant does not use, have none."""
        policy = ApprovalPolicy.of(
            {"mcpServers": ["bank", {"name": "mail_hub", "allowedTools": ["send"]}, 7]}
        )
        assert policy.server_of("bank__pay") == "bank"
        assert policy.server_of("mail_hub__send") == "mail_hub"
        assert policy.server_of("other__pay") is None
        assert policy.server_of("send_email") is None
        assert policy.server_of("bank__") is None


class TestTurns:
    def test_a_call_that_needs_approval_parks_the_run_and_is_announced(self) -> None:
        """The call is not run: the run waits in requires_action (no step: the decision or
        the deadline resumes it) and the approval is announced."""
        t = turn(EMAIL)
        assert (t.run.status, t.run.phase) == ("requires_action", "external")
        assert t.next_step_delay is None
        assert t.announce_approvals and not t.announce_tool_calls
        [call] = t.run.pending_calls
        assert call.approval and call.undecided and call.decision is None
        assert machine.runnable_calls(t.run) == ()

    def test_the_other_calls_of_the_round_run_first(self) -> None:
        """A local call that needs no approval runs at once; the round then parks for the
        decision and the external output, and both are announced."""
        t = turn(EMAIL, WEATHER, LOOKUP)
        assert (t.run.status, t.run.phase) == ("in_progress", "tools")
        assert [c.id for c in machine.runnable_calls(t.run)] == ["c_weather"]
        assert not t.announce_approvals
        parked = machine.on_tool_results(t.run, [("c_weather", "sunny")], NOW)
        assert (parked.run.status, parked.run.phase) == ("requires_action", "external")
        assert parked.announce_approvals and parked.announce_tool_calls
        assert {c.id for c in parked.run.pending_calls} == {"c_mail", "c_lookup"}
        assert parked.messages[0].decision is None

    def test_all_and_mcp_servers(self) -> None:
        """With "all", every call waits (local, external, MCP); an MCP call knows its server."""
        policy = ApprovalPolicy.of({"approvalRequired": "all", "mcpServers": ["bank"]})
        t = turn(WEATHER, LOOKUP, MCP_PAY, approvals=policy)
        assert t.run.status == "requires_action"
        assert all(c.undecided for c in t.run.pending_calls)
        assert t.announce_approvals and not t.announce_tool_calls
        assert {c.id: c.server for c in t.run.pending_calls} == {
            "c_weather": None,
            "c_lookup": None,
            "c_pay": "bank",
        }


class TestDecisions:
    def test_an_approved_call_runs_then_the_model_goes_on(self) -> None:
        """The decision is kept with the call; the call runs (tools step) and its result
        carries the decision; then the model is called."""
        parked = turn(EMAIL).run
        t = machine.on_decisions(parked, [("c_mail", yes())], LATER)
        assert (t.run.status, t.run.phase) == ("in_progress", "tools")
        assert t.next_step_delay == 0.0
        assert t.messages == ()
        [call] = machine.runnable_calls(t.run)
        assert call.decision == yes()
        assert t.run.decided_calls == (("c_mail", True),)
        ran = machine.on_tool_results(t.run, [("c_mail", "sent")], LATER)
        assert ran.run.phase == "model" and ran.next_step_delay == 0.0
        [result] = ran.messages
        assert (result.content, result.decision) == ("sent", yes())

    def test_a_denied_call_is_answered_denied_and_the_model_goes_on(self) -> None:
        """``denied: <reason>``, with the decision, and the model is called at once."""
        t = machine.on_decisions(turn(EMAIL).run, [("c_mail", no("too many emails"))], LATER)
        [result] = t.messages
        assert (result.role, result.tool_call_id) == ("Tool", "c_mail")
        assert result.content == "denied: too many emails"
        assert result.decision == no("too many emails")
        assert (t.run.phase, t.run.status) == ("model", "in_progress")
        assert t.run.answered_calls == ("c_mail",)
        assert t.run.decided_calls == (("c_mail", False),)
        assert machine.denied_output(no(None)) == "denied: the call was not approved"

    def test_the_run_resumes_when_every_call_is_decided(self) -> None:
        """Decisions accumulate: one of two decided leaves the run waiting (announcing
        nothing again); the second resumes it; an approved call does not run before."""
        policy = ApprovalPolicy(every=True)
        parked = turn(EMAIL, WEATHER, approvals=policy).run
        first = machine.on_decisions(parked, [("c_mail", yes())], LATER)
        assert first.run.status == "requires_action"
        assert not (first.announce_approvals or first.announce_tool_calls)
        assert machine.runnable_calls(first.run) == ()
        second = machine.on_decisions(first.run, [("c_weather", no())], LATER)
        assert second.run.phase == "tools"
        assert [c.id for c in machine.runnable_calls(second.run)] == ["c_mail"]
        assert [m.content for m in second.messages] == ["denied: not today"]

    def test_an_approved_local_call_waits_for_the_external_outputs(self) -> None:
        """Approved while an external output is still missing: nothing runs until the output
        is in; then the approved call runs, then the model."""
        parked = machine.on_tool_results(
            turn(EMAIL, WEATHER, LOOKUP).run, [("c_weather", "s")], NOW
        )
        approved = machine.on_decisions(parked.run, [("c_mail", yes())], LATER)
        assert approved.run.status == "requires_action"
        assert not approved.announce_tool_calls, "the lookup was announced already"
        assert machine.runnable_calls(approved.run) == ()
        answered = machine.on_tool_results(approved.run, [("c_lookup", "found")], LATER)
        assert answered.run.phase == "tools"
        assert [c.id for c in machine.runnable_calls(answered.run)] == ["c_mail"]

    def test_an_approved_external_call_is_then_announced_for_its_output(self) -> None:
        """An external tool that needs approval: its output is refused until it is approved;
        approved, the run waits for the output and says so (toolCallsRequired)."""
        policy = ApprovalPolicy(names=frozenset({"lookup"}))
        parked = turn(LOOKUP, approvals=policy).run
        fresh, problem = machine.sort_outputs(parked, ["c_lookup"])
        assert fresh == [] and problem is not None and "approved first" in problem
        t = machine.on_decisions(parked, [("c_lookup", yes())], LATER)
        assert t.run.status == "requires_action"
        assert t.announce_tool_calls and not t.announce_approvals
        assert machine.sort_outputs(t.run, ["c_lookup"]) == (["c_lookup"], None)
        done = machine.on_tool_results(t.run, [("c_lookup", "found")], LATER)
        assert done.run.phase == "model"
        assert done.messages[0].decision == yes()


class TestSortDecisions:
    def test_fresh_repeated_and_refused(self) -> None:
        """The first decision stands: a second one for the same call (same or not) is
        repeated, not an error, even once the run moved on; a call that waits for nothing, or
        a run that no longer waits, is refused with the calls it does wait for."""
        parked = turn(EMAIL, LOOKUP).run
        assert machine.sort_decisions(parked, [("c_mail", True)]).fresh == ("c_mail",)
        refused = machine.sort_decisions(parked, [("c_lookup", True)])
        assert refused.problem is not None
        assert "c_lookup" in refused.problem and "c_mail" in refused.problem
        twice = machine.sort_decisions(parked, [("c_mail", True), ("c_mail", False)])
        assert twice.problem == "the same toolCallId is given more than once"

        decided = machine.on_decisions(parked, [("c_mail", yes())], LATER).run
        again = machine.sort_decisions(decided, [("c_mail", False)])
        assert (again.fresh, again.repeated, again.problem) == (
            (),
            (("c_mail", True, False),),
            None,
        )
        moved_on = replace(decided, status="completed", pending_calls=())
        assert machine.sort_decisions(moved_on, [("c_mail", True)]).problem is None
        late = machine.sort_decisions(moved_on, [("c_other", True)])
        assert late.problem is not None and "not waiting for approvals" in late.problem


class TestEnds:
    def test_the_deadline_answers_every_open_call(self) -> None:
        """At the deadline every open call gets a result: one that waited for a decision says
        it was never run; one decided keeps its decision."""
        parked = turn(EMAIL, LOOKUP, approvals=ApprovalPolicy(every=True)).run
        half = machine.on_decisions(parked, [("c_lookup", yes())], LATER).run
        t = machine.expire(half, LATER, 600)
        assert t.run.status == "expired" and t.run.pending_calls == ()
        texts = {m.tool_call_id: (m.content, m.decision) for m in t.messages}
        assert texts == {
            "c_mail": (
                "error: the run expired while this call waited for approval; it was not run",
                None,
            ),
            "c_lookup": ("error: the run expired before this call was answered", yes()),
        }
        failed = machine.fail(parked, "boom", LATER)
        assert {m.tool_call_id for m in failed.messages} == {"c_mail", "c_lookup"}

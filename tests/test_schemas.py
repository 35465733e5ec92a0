"""Decoding, type inference and validation of request bodies (pure, no I/O)."""

import base64
import json

import pytest

from schemas import (
    AssistantCreate,
    AssistantDelete,
    AssistantPost,
    InvalidMessage,
    RunStep,
    SubmitToolApprovals,
    SubmitToolOutputs,
    decode_body,
    encode_body,
    parse_message,
)
from schemas.export import main as export_main

EXTENSION_CREATE = {
    "id": "chat-1",
    "instructions": "Don't make assumptions.",
    "chatStorageConnectionSetting": "AzureWebJobsStorage",
    "collectionName": "ChatState",
}


def b64(payload: object) -> str:
    return base64.b64encode(json.dumps(payload).encode()).decode()


class TestDecodeBody:
    def test_plain_json(self) -> None:
        """A plain JSON object is read as it is."""
        assert decode_body(json.dumps(EXTENSION_CREATE)) == EXTENSION_CREATE

    def test_base64_json(self) -> None:
        """Base64 of JSON (the Functions default) is detected and decoded."""
        assert decode_body(b64(EXTENSION_CREATE)) == EXTENSION_CREATE

    def test_bytes_and_whitespace(self) -> None:
        """Bytes and surrounding whitespace are accepted."""
        assert decode_body(b'  {"id": "x"}\n') == {"id": "x"}

    @pytest.mark.parametrize(
        ("body", "fragment"),
        [
            ("", "empty"),
            ("hello there", "neither JSON nor Base64"),
            (base64.b64encode(b"\xff\xfe\x00garbage").decode(), "not UTF-8"),
            ("oops", "neither JSON nor Base64-encoded JSON"),
            (base64.b64encode(b"not json at all").decode(), "not valid Base64-decoded JSON"),
            ("[1, 2]", "JSON array"),
            ('"just a string"', "JSON str"),
            ("{broken", "not valid JSON"),
            ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ],
    )
    def test_unreadable_bodies_say_why(self, body: str, fragment: str) -> None:
        """Every unreadable body raises InvalidMessage with a reason naming the problem."""
        with pytest.raises(InvalidMessage, match=fragment):
            decode_body(body)

    def test_encode_round_trips(self) -> None:
        """What the worker writes, in either encoding, it reads back."""
        payload = {"id": "é", "n": 1}
        assert decode_body(encode_body(payload, "none")) == payload
        assert decode_body(encode_body(payload, "base64")) == payload
        assert not encode_body(payload, "base64").startswith("{")


class TestParseMessage:
    def test_extension_create_without_type(self) -> None:
        """The extension's create payload (no type) is an assistantCreate with its fields."""
        message = parse_message(EXTENSION_CREATE)
        assert isinstance(message, AssistantCreate)
        assert message.id == "chat-1"
        assert message.instructions == "Don't make assumptions."
        assert message.collection_name == "ChatState"

    def test_extension_post_without_type(self) -> None:
        """A body with userMessage is an assistantPost."""
        message = parse_message({"id": "c", "userMessage": "hi", "chatModel": "gpt-4o"})
        assert isinstance(message, AssistantPost)
        assert message.chat_model == "gpt-4o"

    def test_tool_outputs_without_type(self) -> None:
        """A body with toolOutputs is a submitToolOutputs."""
        message = parse_message(
            {"id": "c", "runId": "r1", "toolOutputs": [{"toolCallId": "t", "output": "o"}]}
        )
        assert isinstance(message, SubmitToolOutputs)
        assert message.tool_outputs[0].tool_call_id == "t"

    def test_typed_messages(self) -> None:
        """An explicit type selects the schema."""
        assert isinstance(parse_message({"type": "assistantDelete", "id": "c"}), AssistantDelete)
        step = parse_message({"type": "runStep", "id": "c", "runId": "r", "step": 2})
        assert isinstance(step, RunStep)
        assert step.step == 2

    def test_blank_instructions_get_the_default(self) -> None:
        """null or blank instructions become the default system message."""
        message = parse_message({"id": "c", "instructions": None})
        assert isinstance(message, AssistantCreate)
        assert message.instructions == "You are a helpful assistant."

    def test_unknown_fields_are_ignored(self) -> None:
        """Fields the schema does not know do not fail the request."""
        message = parse_message({**EXTENSION_CREATE, "somethingNew": 1})
        assert message.id == "chat-1"

    @pytest.mark.parametrize(
        ("payload", "fragment"),
        [
            (
                {"type": "assistantFrobnicate", "id": "c"},
                "unknown message type 'assistantFrobnicate'",
            ),
            ({"instructions": "x"}, "field 'id' is required"),
            ({"id": "a/b"}, "field 'id': must not contain '/'"),
            ({"id": "a\nb"}, "control characters"),
            ({"id": "x" * 257}, "field 'id': String should have at most 256"),
            (
                {"id": "c", "collectionName": "bad-name"},
                "field 'collectionName': must be a valid Azure table name",
            ),
            ({"id": "c", "temperature": "0.5"}, "field 'temperature'"),
            ({"id": "c", "userMessage": 5}, "field 'userMessage'"),
            ({"id": "c", "userMessage": "hi", "replyTo": "Bad_Queue"}, "field 'replyTo'"),
            ({"id": "c", "requestId": "r" * 201}, "field 'requestId'"),
        ],
    )
    def test_invalid_requests_say_which_field(
        self, payload: dict[str, object], fragment: str
    ) -> None:
        """Schema violations raise InvalidMessage naming the field by its wire name."""
        with pytest.raises(InvalidMessage) as caught:
            parse_message(payload)
        assert fragment in caught.value.reason

    def test_dead_letter_envelope_is_unwrapped(self) -> None:
        """An envelope put back on a work queue yields its message, keeping its identity."""
        envelope = {"deadLetter": {"messageId": "m-1", "reason": "x"}, "message": EXTENSION_CREATE}
        message = parse_message(envelope)
        assert isinstance(message, AssistantCreate)
        assert message.id == "chat-1"
        assert message.request_id == "m-1"

    def test_envelope_keeps_an_existing_request_id(self) -> None:
        """A request that had a requestId keeps it when unwrapped."""
        original = {**EXTENSION_CREATE, "requestId": "r-9"}
        message = parse_message({"deadLetter": {"messageId": "m-1"}, "message": original})
        assert isinstance(message, AssistantCreate)
        assert message.request_id == "r-9"


def test_committed_json_schemas_match_the_models() -> None:
    """schemas/json/ is regenerated whenever a model changes (python -m schemas.export)."""
    assert export_main(["--check"]) == 0


class TestApprovals:
    def test_submit_tool_approvals(self) -> None:
        """Decisions with who and why; without a type, a body with approvals is a
        submitToolApprovals (never a create, which would reset the chat)."""
        body = {
            "id": "chat-1",
            "runId": "run_1",
            "approvals": [
                {"toolCallId": "call_1", "approve": True, "by": "ana@example.com"},
                {"toolCallId": "call_2", "approve": False, "reason": "no"},
            ],
        }
        message = parse_message(body)
        assert isinstance(message, SubmitToolApprovals)
        assert [(a.tool_call_id, a.approve, a.by, a.reason) for a in message.approvals] == [
            ("call_1", True, "ana@example.com", None),
            ("call_2", False, None, "no"),
        ]

    @pytest.mark.parametrize(
        ("approval", "field"),
        [
            ({"toolCallId": "c", "approve": "yes"}, "approvals.0.approve"),
            ({"toolCallId": "c"}, "approvals.0.approve"),
            ({"toolCallId": "c", "approve": True, "by": "x" * 257}, "approvals.0.by"),
            ({"toolCallId": "", "approve": True}, "approvals.0.toolCallId"),
        ],
    )
    def test_invalid_decisions_say_which_field(
        self, approval: dict[str, object], field: str
    ) -> None:
        body = {"type": "submitToolApprovals", "id": "c", "runId": "r", "approvals": [approval]}
        with pytest.raises(InvalidMessage, match=field.replace(".", r"\.")):
            parse_message(body)

    def test_approval_required_on_create(self) -> None:
        """Tool names (MCP ones as server__tool) or "all"; nothing else."""
        names = parse_message(
            {**EXTENSION_CREATE, "approvalRequired": ["send_email", "mail__send"]}
        )
        assert isinstance(names, AssistantCreate)
        assert names.approval_required == ["send_email", "mail__send"]
        every = parse_message({**EXTENSION_CREATE, "approvalRequired": "all"})
        assert isinstance(every, AssistantCreate) and every.approval_required == "all"
        for wrong in ("some", ["no spaces"], [""]):
            with pytest.raises(InvalidMessage, match="approvalRequired"):
                parse_message({**EXTENSION_CREATE, "approvalRequired": wrong})

"""The MCP benchmark's script (``--scenario-callable bench.mcp_model:mcp_scenario``).

A post's user message is ``mcp <n>`` or ``local <n>``: the model asks, in one round, for ``n``
parallel calls of the MCP server's ``weather__get_weather`` or of the local tool
``local_weather`` (the same answer, computed in the worker), then answers ``done``.
"""

from __future__ import annotations

from worker.testing.fake_openai_brain import Conversation, Turn

MCP_TOOL = "weather__get_weather"
LOCAL_TOOL = "local_weather"


def mcp_scenario(conversation: Conversation) -> Turn:
    kind, _, count = conversation.last_user_text().partition(" ")
    if conversation.tool_results() or not count.isdigit():
        return {"content": "done"}
    name = MCP_TOOL if kind == "mcp" else LOCAL_TOOL
    return {
        "tool_calls": [
            {"name": name, "arguments": {"city": f"City {n}"}} for n in range(int(count))
        ]
    }

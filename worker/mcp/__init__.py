"""MCP servers as tools (SPEC §5.5): the worker as a client of the servers an operator
allow-listed in ``WORKER_MCP_SERVERS`` (Streamable HTTP, the official ``mcp`` SDK).

``session.py`` keeps one session per server (opened on first use, re-opened when it breaks);
``servers.py`` lists each server's tools (cached a minute) and calls them; ``tools.py`` and
``errors.py`` are what the handlers see of them. Only ``session.py`` and ``servers.py`` import
the SDK, and only the wiring imports them, when servers are configured: a worker without MCP
servers never loads ``mcp``.
"""

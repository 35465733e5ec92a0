"""MCP servers as tools (SPEC §5.5): the worker as a client of the servers an operator
allow-listed in ``WORKER_MCP_SERVERS`` (Streamable HTTP, the official ``mcp`` SDK)."""

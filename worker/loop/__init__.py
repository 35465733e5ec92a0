"""The heart: one message from receive to ack (``worker.py``).

What handlers and adapters may import of it is its contract: the handler interface
(``handling.py``) and the kinds of failure (``errors.py``). The rest is the loop's own: the
pure decision of what to do with a message (``outcome.py``) and the storage gate that pauses it
during an outage (``outage.py``).
"""

"""Dead letters: the envelope a message is moved to its poison queue in (``envelope.py``,
pure), reading poison queues (``reader.py``), and what ``poison`` selects and replays
(``operations.py``)."""

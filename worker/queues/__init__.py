"""The queue seam: what the loop needs from a queue service (``transport.py``), on Azure
Storage (``azure.py``) and in memory for tests (``memory.py``); a received message's lease
(``lease.py``); when each queue is polled (``polling.py``, pure)."""

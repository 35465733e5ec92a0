"""The producer's side, for the CLI and the demo: waiting for a request's reply on a reply
queue (``replies.py``)."""

"""The HTTP front door of ``WORKER_HTTP_PORT``: the server (``server.py``) and one module per
route family: probes and metrics (``probes.py``), the query API (``query.py``), and the
webhooks of the model provider (``webhooks.py``)."""

"""What an operator watches (SPEC §10): liveness and readiness (``health.py``), Prometheus
metrics (``metrics.py``), the queue depth gauge (``depth.py``), OpenTelemetry traces
(``tracing.py``), structured logs (``logs.py``), the wrappers that report model calls
(``instrument.py``), the event loop's lag (``lag.py``) and the bound on label values taken
from requests (``labels.py``).

``Health`` and ``Metrics`` are plain objects the app builds and passes down; nothing here is
global. The modules import lazily what they need (prometheus-client, the tracing SDK).
"""

from worker.observability.health import Health

__all__ = ["Health"]

"""Message handlers: one module per message type, wired together by ``build_registry``."""

from handlers.approvals import ApprovalsHandler
from handlers.create import CreateHandler
from handlers.deadline import DeadlineHandler
from handlers.delete import DeleteHandler
from handlers.post import PostHandler
from handlers.services import RunServices
from handlers.step import StepHandler
from handlers.submit import SubmitHandler
from worker.loop.handling import HandlerRegistry


def build_registry(services: RunServices) -> HandlerRegistry:
    """The handlers of every message type this worker serves, per queue."""
    return HandlerRegistry(
        requests={
            "assistantCreate": CreateHandler(services),
            "assistantDelete": DeleteHandler(services),
            "assistantPost": PostHandler(services),
            "submitToolOutputs": SubmitHandler(services),
            "submitToolApprovals": ApprovalsHandler(services),
        },
        runs={"runStep": StepHandler(services)},
        deadlines={"runDeadline": DeadlineHandler(services)},
    )

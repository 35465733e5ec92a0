"""``assistant-worker demo``: the offline end-to-end demo behind ``make run``."""

import argparse

from worker.config.settings import Settings


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the offline end-to-end demo (what `make run` runs)",
        description="Start Azurite (unless AzureWebJobsStorage is set), the fake OpenAI server "
        "as the weather bot of the Assistants docs (unless OPENAI_API_KEY or "
        "AZURE_OPENAI_ENDPOINT is set), and the worker; create an assistant, post the "
        "question, print the conversation as it happens, the reply and the final AssistantState's "
        "counts, then the commands to try from another terminal.",
    )
    parser.add_argument("--api", choices=["chat", "responses", "assistants"], default="chat",
                        help="the model API the assistant uses (default chat; assistants is "
                        "legacy)")  # fmt: skip
    parser.add_argument("--question", help="what the user asks")
    parser.add_argument("--once", action="store_true", help="exit after the answer")
    parser.set_defaults(handler=demo_command, needs_settings=False)


def demo_command(args: argparse.Namespace, settings: Settings | None) -> int:
    from worker.devtools.demo import QUESTION, demo

    return demo(api=args.api, question=args.question or QUESTION, keep_serving=not args.once)

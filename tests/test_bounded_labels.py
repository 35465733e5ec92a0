"""Bounded labels (SPEC §10): a model name a request chooses keeps the configured default and
at most 10 other values per process; the rest are ``other``, in the metrics and in the names
of the ``chat {model}`` spans alike. Through a real worker on Azurite and the fake model, and
the helper on its own.
"""

import asyncio
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.env import StorageEnv, run
from tests.support.runs import create_body, eventually, model_env, post_body, runs_finished
from tests.support.scrape import Samples, http_settings, scrape, total
from worker.app import open_app
from worker.observability.labels import MAX_KEPT_VALUES, OTHER, BoundedLabels
from worker.observability.tracing import MAX_MODEL_CHARS, Tracing
from worker.testing import FakeOpenAI

MODEL = "assistant_worker_model_call_duration_seconds_count"
DEFAULT_MODEL = "echo-default"


def test_the_default_and_the_first_ten_are_kept_the_rest_are_other() -> None:
    labels = BoundedLabels([DEFAULT_MODEL, None])
    seen = [labels(f"m{n}") for n in range(15)]
    assert seen == [f"m{n}" for n in range(10)] + [OTHER] * 5
    # Kept values stay kept, the default always is, a late value never is.
    assert labels("m3") == "m3"
    assert labels(DEFAULT_MODEL) == DEFAULT_MODEL
    assert labels("m14") == OTHER
    assert labels.kept == {f"m{n}" for n in range(10)}


def test_values_no_model_is_named_are_other_and_take_no_place() -> None:
    labels = BoundedLabels()
    assert labels("x" * 10_000) == OTHER
    assert labels("bad\nname") == OTHER
    assert labels("") == OTHER
    assert labels.kept == frozenset()
    assert labels("gpt-4o") == "gpt-4o"


def _model_labels(samples: Samples) -> dict[str, float]:
    calls: dict[str, float] = {}
    for (name, labels), count in samples.items():
        if name == MODEL:
            model = dict(labels)["model"]
            calls[model] = calls.get(model, 0.0) + count
    return calls


def test_models_named_by_producers_make_at_most_ten_series(storage: StorageEnv) -> None:
    """Sixteen chats, each posted with a model of its own (one with a 300-character name):
    every run is answered; the metrics and the span names hold the default and ten of the
    names, everything else is counted as ``other``; the span attribute keeps the name asked
    for, cut."""
    models = [f"echo-{n:02d}" for n in range(15)] + ["echo-" + "x" * 295]
    chats = {f"labels-{n:02d}-{storage.suffix}": model for n, model in enumerate(models)}
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def scenario() -> Samples:
        async with FakeOpenAI() as fake:
            settings = http_settings(
                storage, **model_env(fake.base_url, CHAT_MODEL_DEPLOYMENT_NAME=DEFAULT_MODEL)
            )
            async with open_app(settings, tracing=Tracing.from_provider(provider)) as app:
                task = asyncio.create_task(app.worker.run())
                try:
                    # One run with the default model, then one per producer-chosen model.
                    await storage.send(create_body("labels-default", storage.table))
                    await storage.send(post_body("labels-default", storage.table, "hello"))
                    for chat_id, model in chats.items():
                        await storage.send(create_body(chat_id, storage.table))
                        await storage.send(
                            post_body(chat_id, storage.table, "hello", chatModel=model)
                        )

                    async def all_ended() -> bool:
                        for chat_id in ["labels-default", *chats]:
                            if await runs_finished(storage, chat_id, storage.table, 1) is None:
                                return False
                        return True

                    await eventually(all_ended, 60, "every run to end")
                    return await scrape(app)
                finally:
                    app.worker.stop()
                    await asyncio.wait_for(task, 30)

    try:
        samples = run(scenario())
        spans = [span for span in exporter.get_finished_spans() if span.name.startswith("chat ")]
    finally:
        provider.shutdown()

    calls = _model_labels(samples)
    kept = set(calls) - {DEFAULT_MODEL, OTHER}
    assert calls.get(DEFAULT_MODEL, 0) >= 1, calls
    assert len(kept) == MAX_KEPT_VALUES, calls
    assert kept <= set(models[:15]), calls
    assert calls[OTHER] >= len(models) - MAX_KEPT_VALUES, calls
    assert total(samples, MODEL) == sum(calls.values())

    span_models = {span.name.removeprefix("chat ") for span in spans}
    assert span_models == set(calls), (span_models, set(calls))
    asked = {str(_attributes(span)["gen_ai.request.model"]) for span in spans}
    assert set(models[:15]) | {DEFAULT_MODEL} <= asked
    assert all(len(model) <= MAX_MODEL_CHARS for model in asked)
    assert any(model.startswith("echo-xxxxxxxxxx") for model in asked)


def _attributes(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})

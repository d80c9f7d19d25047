"""Fixtures of the ingress tests: a real uvicorn server for an app (`serve`) and the in-process engine as a
`Worker` (`engine_worker`)."""

from __future__ import annotations

import threading

import pytest
import uvicorn

import moemesh
from moemesh.actors.attention.engine import AsyncEngine, Engine
from moemesh.actors.attention.grammar import grammar_for
from moemesh.actors.ingress.app import Ingress
from moemesh.actors.ingress.metrics import Metrics
from moemesh.actors.request import Delta, RequestParams


class EngineWorker:
    """The in-process `AsyncEngine` (actors/attention/engine.py) as a `Worker`: the whole adapter."""

    def __init__(self, engine):
        self.engine = engine

    async def generate(self, request_id, prompt_token_ids, params):
        async for out in self.engine.generate(request_id, prompt_token_ids, RequestParams(**params.model_dump())):
            yield out.delta()

    async def load(self) -> float:
        stats = self.engine.engine.stats()
        return stats.num_running + stats.num_waiting

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)


@pytest.fixture(scope="session")
def engine_worker():
    """`engine_worker(async_engine)` -> a `Worker` over it."""
    return EngineWorker


@pytest.fixture(scope="module")
def serve():
    """`serve(app)` runs the app on a real uvicorn server on 127.0.0.1:<free port> in a thread (until the module's
    tests are done); returns its URL."""
    servers = []

    def start(app) -> str:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_openai(serve, tiny_model_dir):
    """The official `openai` client against a real server running the ingress over the in-process engine on `tiny`,
    with its grammar compiler (structured output, forced tool calls); the model is served as "tiny"."""
    import openai

    model = moemesh.load_model(tiny_model_dir)
    engine = AsyncEngine(Engine(model, grammar=grammar_for(tiny_model_dir, model.config)))
    ingress = Ingress.from_checkpoint(tiny_model_dir, [EngineWorker(engine)], model_name="tiny",
                                      metrics=Metrics(process_collectors=False))
    return openai.OpenAI(base_url=serve(ingress.http_app) + "/v1", api_key="unused", max_retries=0, timeout=120)

"""create_app(): routes, SSE streaming, and the lifespan that loads the bundle and runs the engine loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tokenizers import Tokenizer

from service import errors
from service.bundle import Bundle, load_bundle
from service.config import Settings
from service.engine import Engine
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.schemas import ChatCompletionRequest, CompletionRequest
from service.serving import OpenAIServing
from service.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything the lifespan builds; routes reach it through app.state.runtime."""

    bundle: Bundle
    engine: Engine
    scheduler: Scheduler
    serving: OpenAIServing
    metrics: Metrics
    model_name: str
    started: int


def build_runtime(settings: Settings) -> Runtime:
    bundle = load_bundle(settings.bundle)
    max_len = min(settings.max_model_len, bundle.max_context)
    engine = Engine(bundle, settings.max_num_seqs, max_len, settings.device, settings.intra_op_threads)
    if settings.verify_golden:
        log.info("golden outputs reproduce (max |dlogit| %.2e)", engine.check_golden())
    vocab = Tokenizer.from_file(str(bundle.tokenizer_file))
    token = lambda i: vocab.id_to_token(i) if i is not None else None  # noqa: E731
    tokenizer = TextTokenizer(
        bundle.tokenizer_file, bundle.chat_template, token(bundle.bos_token_id), token(bundle.eos_token_id)
    )
    scheduler = Scheduler(engine, tokenizer, bundle.eos_token_id, max_len, settings.prefill_chunk)
    name = settings.served_model_name or bundle.name
    metrics = Metrics(name)
    metrics.watch(lambda: scheduler.num_running, lambda: scheduler.num_waiting, scheduler.kv_usage)
    serving = OpenAIServing(settings, scheduler, tokenizer, name, metrics, bundle.generation_defaults)
    log.info(
        "serving %s (%s, %s) from %s: %d slots x %d positions on %s",
        name,
        bundle.dtype,
        bundle.quantization,
        bundle.path,
        settings.max_num_seqs,
        max_len,
        engine.device,
    )
    return Runtime(bundle, engine, scheduler, serving, metrics, name, int(time.time()))


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await asyncio.to_thread(build_runtime, settings)
        runtime.scheduler.start()
        app.state.runtime = runtime
        try:
            yield
        finally:
            runtime.scheduler.stop()

    app = FastAPI(title="gpt-onnx-serve", version="0.1.0", lifespan=lifespan)
    errors.install(app)

    def runtime(request: Request) -> Runtime:
        return request.app.state.runtime

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        rt = runtime(request)
        alive = rt.scheduler.alive
        body = {
            "status": "ok" if alive else "engine loop stopped",
            "device": rt.engine.device,
            "providers": rt.engine.providers,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        rt = getattr(request.app.state, "runtime", None)
        ok = rt is not None and rt.scheduler.alive
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        rt = runtime(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": rt.model_name,
                    "object": "model",
                    "created": rt.started,
                    "owned_by": "gpt-onnx-serve",
                    "max_model_len": rt.scheduler.max_model_len,
                    "device": rt.engine.device,
                    "providers": rt.engine.providers,
                    "dtype": rt.bundle.dtype,
                    "quantization": rt.bundle.quantization,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await runtime(request).serving.completions(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await runtime(request).serving.chat(body))

    return app


def _respond(result: dict | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

"""create_app(): routes, SSE streaming, and the lifespan that loads the bundle and runs the engine loop."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import errors
from service.bundle import Bundle, load_bundle
from service.client import EngineClient
from service.config import Settings
from service.engine import Engine
from service.errors import APIError, model_not_found
from service.grammar import Grammars
from service.inspect_api import InspectRequest, InspectServing, page
from service.inspector import Inspector
from service.metrics import Metrics
from service.middleware import AdmissionGate, RequestIdMiddleware, SizeLimitMiddleware
from service.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from service.scheduler import PREFILL_CALL_TOKENS, Scheduler
from service.serving import OpenAIServing
from service.tokenizer import TextTokenizer
from service.validation import Validator

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
    inspection: InspectServing


def build_runtime(settings: Settings) -> Runtime:
    bundle = load_bundle(settings.bundle)
    max_len = min(settings.max_model_len, bundle.max_context)
    engine = Engine(
        bundle,
        settings.max_num_seqs,
        max_len,
        settings.device,
        settings.intra_op_threads,
        cuda_graphs=settings.cuda_graphs,
        reduce_logits=None if settings.reduce_logits else False,  # None: on CUDA
    )
    if settings.verify_golden:
        log.info("golden outputs reproduce (max |dlogit| %.2e)", engine.check_golden())
    if engine.device == "cuda":
        log.info("CUDA warm-up: each kind of call made once (%.2f s)", engine.warm_up(PREFILL_CALL_TOKENS))
    tokenizer = TextTokenizer.from_bundle(bundle)
    grammars = Grammars(bundle.tokenizer_file, bundle.eos_token_ids, bundle.vocab_size)
    scheduler = Scheduler(
        engine,
        tokenizer,
        bundle.eos_token_ids,
        max_len,
        settings.max_num_batched_tokens,
        settings.max_waiting_requests,
        settings.max_queued_prompt_tokens,
        grammars,
        settings.prefix_cache,
        settings.prefill_chunk or None,  # None: the device's default
    )
    name = settings.served_model_name or bundle.name
    metrics = Metrics(name)
    metrics.watch(
        lambda: scheduler.num_running,
        lambda: scheduler.num_waiting,
        scheduler.kv_usage,
        lambda: (scheduler.prefix.queries, scheduler.prefix.hits),
        scheduler.prefix.shared_positions,
    )
    validator = Validator(settings, tokenizer, name, max_len, bundle.generation_defaults, grammars)
    client = EngineClient(scheduler, metrics, settings.request_timeout)
    serving = OpenAIServing(settings, validator, client, tokenizer, name)
    log.info(
        "serving %s (%s, %s) from %s: %d slots x %d positions on %s; %d tokens a step, a prompt's at most %d",
        name,
        bundle.dtype,
        bundle.quantization,
        bundle.path,
        settings.max_num_seqs,
        max_len,
        engine.device,
        settings.max_num_batched_tokens,
        min(scheduler.prefill_chunk, settings.max_num_batched_tokens),
    )
    inspector = Inspector(bundle.inspect, engine.providers, settings.intra_op_threads) if bundle.inspect else None
    inspection = InspectServing(settings, scheduler, tokenizer, name, inspector)
    return Runtime(bundle, engine, scheduler, serving, metrics, name, int(time.time()), inspection)


def create_app(settings: Settings, prebuilt: Runtime | None = None) -> FastAPI:
    """`prebuilt`: a runtime the launcher already built (so a bundle it cannot serve is refused before any port
    is bound); without it the lifespan builds one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = prebuilt if prebuilt is not None else await asyncio.to_thread(build_runtime, settings)
        runtime.scheduler.start()
        app.state.runtime = runtime
        try:
            yield
        finally:
            runtime.scheduler.stop()

    app = FastAPI(title="gpt-onnx-serve", version="0.1.0", lifespan=lifespan)
    app.state.draining = False  # set on SIGTERM: /ready fails and new generation requests get 503
    errors.install(app)
    app.add_middleware(SizeLimitMiddleware, limit=settings.max_body_bytes, header_limit=settings.max_header_bytes)
    app.add_middleware(
        AdmissionGate,
        limit=settings.max_num_seqs + settings.max_waiting_requests,
        paths=("/v1/completions", "/v1/chat/completions"),
    )
    app.add_middleware(RequestIdMiddleware)
    if settings.origins():  # outermost: the size limit's 413 and the gate's 429 carry the CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.origins(),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # the openai SDKs send their own X-Stainless-* headers
        )
    keys = [k.encode() for k in settings.keys()]

    def runtime(request: Request) -> Runtime:
        return request.app.state.runtime

    async def authorized(request: Request) -> None:
        """Bearer API key, compared in constant time against every configured key."""
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        match = False
        for key in keys:
            match |= hmac.compare_digest(token.encode(), key)
        if scheme.lower() != "bearer" or not match:
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")

    async def admitting(request: Request) -> None:
        if request.app.state.draining:
            raise APIError(
                503, "the server is shutting down", "server_error", code="draining", headers={"Retry-After": "1"}
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

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
        ok = (
            rt is not None
            and rt.scheduler.alive
            and not request.app.state.draining
            and not (settings.unready_when_saturated and rt.scheduler.saturated())
        )
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def model_card(rt: Runtime) -> dict:
        """The served model as OpenAI's model object, with vLLM's max_model_len and what it runs on."""
        return {
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

    @v1.get("/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": [model_card(runtime(request))]}

    @v1.get("/models/{model:path}")
    async def model(model: str, request: Request) -> dict:
        """OpenAI's "retrieve model" (the openai client's `models.retrieve`): the served model, else 404."""
        rt = runtime(request)
        if model != rt.model_name:
            raise model_not_found(model)
        return model_card(rt)

    @app.get("/metrics", dependencies=[Depends(authorized)] if settings.metrics_require_key else [])
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @v1.post("/completions", dependencies=[Depends(admitting)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await runtime(request).serving.completions(body, request))

    @v1.post("/chat/completions", dependencies=[Depends(admitting)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await runtime(request).serving.chat(body, request))

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
        return JSONResponse(runtime(request).serving.tokenize(body))

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
        return JSONResponse(runtime(request).serving.detokenize(body))

    @v1.post("/inspect", dependencies=[Depends(admitting)])
    async def inspect(body: InspectRequest, request: Request) -> Response:
        return Response(await runtime(request).inspection.inspect(body), media_type="application/json")

    @app.get("/inspect", include_in_schema=False)
    async def inspect_page() -> HTMLResponse:
        return HTMLResponse(page())

    app.include_router(v1)
    return app


def _respond(result: dict | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

"""POST /v1/inspect and GET /inspect: every head's attention pattern and the next-token distribution of a prompt.

The request mirrors the completion and chat requests' names (`model`, `prompt` or `messages`); the response is

  {"model", "tokens": [{"id", "text"}] x T,
   "layers": [{"layer": layer, "heads": [{"head": h, "attention": [[T floats] x T]}]}],
   "next_tokens": [[{"id", "text", "prob"}] x top_k] x T}

`attention[q][k]` is how much query position q attends to key position k (0 for k > q, each row sums to 1),
rounded to 4 decimals; with `"encoding": "float16-base64"` each matrix is instead the base64 of its T x T
float16 values, row-major (little-endian). A response holds at most MAX_ATTENTION_VALUES attention values
(layers x heads x T x T); past that the request is refused, asking for fewer layers or heads.

The graph runs on the engine thread between two engine steps (`Scheduler.run_between_steps`) and counts as one
waiting request against the queue's bounds; everything before (validation, tokenization) and after (top-k,
rounding, JSON) runs off both the engine thread and the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.config import Settings
from service.errors import APIError, bad_request, model_not_found, overloaded
from service.inspector import Inspection, Inspector, top_tokens
from service.protocol import ChatMessage
from service.scheduler import EngineStopped, QueueFull, Scheduler
from service.tokenizer import TemplateError, TextTokenizer

MAX_ATTENTION_VALUES = 1 << 22  # per response: ~30 MB of JSON at most, ~11 MB as float16-base64
DEFAULT_TOP_K = 5
PAGE = Path(__file__).with_name("static") / "inspect.html"

Index = Annotated[int, Field(ge=0)]


class InspectRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    model: str
    prompt: str | list[int] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    layers: Annotated[list[Index], Field(min_length=1, max_length=1024)] | None = None  # default: all
    heads: Annotated[list[Index], Field(min_length=1, max_length=1024)] | None = None  # default: all
    top_k: Annotated[int, Field(ge=0, le=20)] = DEFAULT_TOP_K
    encoding: Literal["float", "float16-base64"] = "float"


def unavailable() -> APIError:
    return APIError(
        404,
        "this model's bundle has no inspection graph (quantized, or exported without one); "
        "export it again with `python -m export` to inspect it",
        "not_found_error",
        None,
        "inspection_unavailable",
    )


class InspectServing:
    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        tokenizer: TextTokenizer,
        model_name: str,
        inspector: Inspector | None,
    ) -> None:
        self.settings, self.scheduler, self.tokenizer = settings, scheduler, tokenizer
        self.model_name, self.inspector = model_name, inspector

    async def inspect(self, req: InspectRequest) -> bytes:
        """The JSON body of the response (rendered off the event loop: it may be tens of megabytes)."""
        if not self.scheduler.alive:
            raise APIError(503, "the engine is not running", "server_error", code="engine_unavailable")
        if self.scheduler.saturated():
            raise overloaded("the waiting queue is full")
        if req.model != self.model_name:
            raise model_not_found(req.model)
        if self.inspector is None:
            raise unavailable()
        graph = self.inspector.graph
        layers = self._indices(req.layers, graph.n_layer, "layers")
        heads = self._indices(req.heads, graph.n_head, "heads")
        ids = await asyncio.to_thread(self._prompt_ids, req)
        limit = min(graph.max_tokens, self.scheduler.max_model_len)
        if len(ids) > limit:
            raise APIError(
                400,
                f"Inspection reads at most {limit} tokens. However, your prompt has {len(ids)} tokens. "
                "Please reduce the length of the prompt.",
                "invalid_request_error",
                "messages" if req.messages is not None else "prompt",
                "context_length_exceeded",
            )
        values = len(layers) * len(heads) * len(ids) ** 2
        if values > MAX_ATTENTION_VALUES:
            raise bad_request(
                f"the response would hold {values} attention values ({len(layers)} layers x {len(heads)} heads x "
                f"{len(ids)}^2 positions); at most {MAX_ATTENTION_VALUES}: ask for fewer layers or heads",
                "layers",
                "response_too_large",
            )
        await asyncio.to_thread(self.inspector.open)
        result = await self._run(ids)
        return await asyncio.to_thread(self._render, ids, result, layers, heads, req.top_k, req.encoding)

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _indices(asked: list[int] | None, n: int, param: str) -> list[int]:
        if asked is None:
            return list(range(n))
        if any(i >= n for i in asked):
            raise bad_request(f"{param} must be indices in [0, {n})", param)
        if len(set(asked)) != len(asked):
            raise bad_request(f"{param} must not repeat an index", param)
        return list(asked)

    def _prompt_ids(self, req: InspectRequest) -> list[int]:
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            if len(req.messages) > self.settings.max_messages:
                raise bad_request(f"at most {self.settings.max_messages} messages", "messages")
            try:
                text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
            except TemplateError as exc:
                raise bad_request(str(exc), "messages") from exc
            ids = self.tokenizer.encode(text)
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt)
        else:
            ids = list(req.prompt or [])
            vocab = self.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"token ids must be in [0, {vocab})", "prompt")
        if not ids:
            raise bad_request("the prompt must not be empty", "prompt")
        return ids

    # ------------------------------------------------------------------ the engine thread

    async def _run(self, ids: list[int]) -> Inspection:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Inspection] = loop.create_future()
        inspector = self.inspector
        if inspector is None:
            raise unavailable()

        def settle(result: Inspection | None, error: BaseException | None) -> None:
            if done.done():  # the client went away or the deadline passed
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def job() -> None:
            if done.done():
                return
            try:
                result = inspector.run(ids)
            except Exception as exc:
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        try:
            self.scheduler.run_between_steps(job, len(ids))
        except QueueFull as exc:
            raise overloaded(str(exc)) from exc
        except EngineStopped as exc:
            raise APIError(503, str(exc), "server_error", code="engine_unavailable") from exc
        try:
            return await asyncio.wait_for(done, self.settings.request_timeout)
        except asyncio.TimeoutError as exc:
            raise APIError(
                504,
                f"the request ran past its deadline of {self.settings.request_timeout:g}s",
                "timeout_error",
                code="deadline_exceeded",
            ) from exc
        except APIError:
            raise
        except Exception as exc:
            raise APIError(
                500, f"inspection failed: {type(exc).__name__}", "server_error", code="engine_error"
            ) from exc

    # ------------------------------------------------------------------ the response

    def _render(
        self, ids: list[int], result: Inspection, layers: list[int], heads: list[int], top_k: int, encoding: str
    ) -> bytes:
        text = self.tokenizer.token_text
        top_ids, top_probs = top_tokens(result.logits, top_k)  # (T, k) each
        body: dict[str, Any] = {
            "model": self.model_name,
            "tokens": [{"id": int(i), "text": text(int(i))} for i in ids],
            "layers": [
                {
                    "layer": layer,
                    "heads": [{"head": h, "attention": _matrix(result.attention[layer, h], encoding)} for h in heads],
                }
                for layer in layers
            ],
            "next_tokens": [
                [{"id": int(i), "text": text(int(i)), "prob": round(float(p), 6)} for i, p in zip(row_ids, row_probs)]
                for row_ids, row_probs in zip(top_ids, top_probs)
            ],
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _matrix(a: np.ndarray, encoding: str) -> list[list[float]] | str:
    """One head's (T, T) probabilities: rounded floats, or base64 of little-endian float16, row-major."""
    if encoding == "float16-base64":
        return base64.b64encode(np.ascontiguousarray(a, dtype="<f2").tobytes()).decode("ascii")
    return np.round(a.astype(np.float64), 4).tolist()


def page() -> str:
    return PAGE.read_text(encoding="utf-8")

"""The OpenAI handler: validates a request, tokenizes it, submits it to the scheduler, and shapes what comes back
as one JSON response or as server-sent events in OpenAI's chunk format.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from service.config import Settings
from service.errors import APIError, bad_request, overloaded
from service.metrics import Metrics
from service.sampler import SamplingParams
from service.scheduler import (
    EngineStopped,
    GenerationRequest,
    QueueFull,
    RequestState,
    Scheduler,
    SchedulerError,
    TokenEvent,
    TokenLogprob,
)
from service.schemas import ChatCompletionRequest, CompletionRequest
from service.tokenizer import TemplateError, TextTokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


@dataclass
class Choice:
    """What one choice accumulated: text, tokens, logprobs, how it ended."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Submission:
    """One prompt submitted with n choices, and the queue its events arrive on."""

    state: RequestState
    events: asyncio.Queue[TokenEvent]
    prompt_ids: list[int]
    n: int
    index_base: int  # choice index of this prompt's first choice (prompt i -> i * n)


class OpenAIServing:
    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        tokenizer: TextTokenizer,
        model_name: str,
        metrics: Metrics,
        generation_defaults: dict[str, float],
    ) -> None:
        self.settings, self.scheduler, self.tokenizer = settings, scheduler, tokenizer
        self.generation_defaults = generation_defaults
        self.model_name, self.metrics = model_name, metrics
        self.max_model_len = scheduler.max_model_len

    # ------------------------------------------------------------------ endpoints

    async def completions(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self._check_admission()
        self._check_common(req, req.n)
        if req.logprobs is not None and req.logprobs > self.settings.max_logprobs:
            raise bad_request(f"logprobs must be at most {self.settings.max_logprobs}", "logprobs")
        prompts = self._prompts(req.prompt)
        max_tokens = req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        for p in prompts:
            self._check_length(len(p), req.max_tokens, max_tokens)
        params = req.to_sampling_params(max_tokens, req.logprobs, self.generation_defaults)
        echo_logprobs = req.echo and req.logprobs is not None
        subs = self._submit(prompts, params, req.n, prompt_logprobs=echo_logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse_stream(self._stream_completion(subs, rid, created, req.echo, include_usage))
        choices = await self._collect(subs)
        out = []
        for sub in subs:
            for i in range(sub.n):
                c = choices[sub.index_base + i]
                text = (self.tokenizer.decode(sub.prompt_ids) if req.echo else "") + c.text
                lp = (
                    self._completion_logprobs(c, sub.prompt_ids if req.echo else None)
                    if req.logprobs is not None
                    else None
                )
                out.append(
                    {"text": text, "index": sub.index_base + i, "logprobs": lp, "finish_reason": c.finish_reason}
                )
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": out,
            "usage": self._usage(subs, choices),
        }

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self._check_admission()
        if len(req.messages) > self.settings.max_messages:
            raise bad_request(f"at most {self.settings.max_messages} messages", "messages")
        self._check_common(req, req.n)
        if req.logprobs and (req.top_logprobs or 0) > self.settings.max_logprobs:
            raise bad_request(f"top_logprobs must be at most {self.settings.max_logprobs}", "top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = self.tokenizer.encode_chat(messages)
        except TemplateError as exc:
            raise bad_request(str(exc), "messages") from exc
        requested = req.max_completion_tokens or req.max_tokens
        max_tokens = requested or min(self.settings.default_max_tokens, self.max_model_len - len(prompt))
        self._check_length(len(prompt), requested, max_tokens)
        params = req.to_sampling_params(
            max_tokens, (req.top_logprobs or 0) if req.logprobs else None, self.generation_defaults
        )
        subs = self._submit([prompt], params, req.n, prompt_logprobs=False)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse_stream(self._stream_chat(subs, rid, created, include_usage))
        choices = await self._collect(subs)
        out = []
        for i in range(req.n):
            c = choices[i]
            out.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": [self._chat_logprob(lp) for lp in c.logprobs]} if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": out,
            "usage": self._usage(subs, choices),
        }

    # ------------------------------------------------------------------ validation

    def _check_admission(self) -> None:
        """Before any tokenization: is the engine alive, and is there room in the waiting queue?"""
        if not self.scheduler.alive:
            raise APIError(503, "the engine is not running", "server_error", code="engine_unavailable")
        if self.scheduler.saturated():
            raise overloaded("the waiting queue is full")

    def _check_common(self, req: CompletionRequest | ChatCompletionRequest, n: int) -> None:
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > self.settings.max_tokens_limit:
            raise bad_request(
                f"max_tokens must be at most {self.settings.max_tokens_limit}", "max_tokens", "max_tokens_too_large"
            )
        if req.model != self.model_name:
            raise APIError(
                404, f"The model `{req.model}` does not exist.", "not_found_error", "model", "model_not_found"
            )
        if n > self.settings.max_n:
            raise bad_request(f"n must be at most {self.settings.max_n}", "n")
        stops = req.stop_list
        if len(stops) > self.settings.max_stop_sequences:
            raise bad_request(f"at most {self.settings.max_stop_sequences} stop sequences", "stop")
        if any(len(s) > self.settings.max_stop_length for s in stops):
            raise bad_request(f"stop sequences are at most {self.settings.max_stop_length} characters", "stop")

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in prompt]  # type: ignore[arg-type]
        vocab = self.tokenizer.vocab_size
        for p in prompts:
            if not p:
                raise bad_request("prompt must not be empty", "prompt")
            if any(not 0 <= t < vocab for t in p):
                raise bad_request(f"token ids must be in [0, {vocab})", "prompt")
        return prompts

    def _check_length(self, prompt_len: int, requested: int | None, max_tokens: int) -> None:
        limit = self.settings.max_prompt_tokens
        if limit and prompt_len > limit:
            raise bad_request(
                f"the prompt has {prompt_len} tokens; at most {limit} are accepted", "prompt", "prompt_too_long"
            )
        if prompt_len >= self.max_model_len or (requested is not None and prompt_len + requested > self.max_model_len):
            detail = f" ({prompt_len} in the prompt, {requested} in the completion)" if requested else ""
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + (requested or 0)} tokens{detail}. "
                "Please reduce the length of the prompt or completion.",
                "invalid_request_error",
                "messages" if requested is None else "max_tokens",
                "context_length_exceeded",
            )
        if max_tokens < 1:
            raise APIError(
                400,
                "the prompt leaves no room for a completion",
                "invalid_request_error",
                "prompt",
                "context_length_exceeded",
            )

    # ------------------------------------------------------------------ scheduler plumbing

    def _submit(
        self, prompts: list[list[int]], params: SamplingParams, n: int, prompt_logprobs: bool
    ) -> list[Submission]:
        loop = asyncio.get_running_loop()
        subs: list[Submission] = []
        try:
            for i, prompt in enumerate(prompts):
                events: asyncio.Queue[TokenEvent] = asyncio.Queue()
                request = GenerationRequest(uuid.uuid4().hex, tuple(prompt), params, n, prompt_logprobs)

                def sink(event: TokenEvent, q: asyncio.Queue[TokenEvent] = events) -> None:
                    loop.call_soon_threadsafe(q.put_nowait, event)

                state = self.scheduler.submit(request, sink)
                subs.append(Submission(state, events, prompt, n, i * n))
                self.metrics.prompt_tokens.inc(len(prompt) * n)
        except SchedulerError as exc:
            for sub in subs:
                self.scheduler.cancel(sub.state)
            if isinstance(exc, QueueFull):
                raise overloaded(str(exc)) from exc
            if isinstance(exc, EngineStopped):
                raise APIError(503, str(exc), "server_error", code="engine_unavailable") from exc
            raise bad_request(str(exc), code="context_length_exceeded") from exc
        return subs

    async def _events(self, subs: list[Submission]) -> AsyncIterator[tuple[Submission, TokenEvent]]:
        """Events of all submissions as they come, until every choice finished; cancels the rest if abandoned."""
        arrival = min(s.state.submitted for s in subs)
        remaining = {id(s): s.n for s in subs}
        open_choices = sum(remaining.values())
        last: dict[tuple[int, int], float] = {}
        waiters = {asyncio.ensure_future(s.events.get()): s for s in subs}
        deadline = arrival + self.settings.request_timeout
        try:
            while open_choices:
                timeout = max(deadline - time.perf_counter(), 0.0)
                done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    self.metrics.finished("timeout")
                    raise APIError(
                        504,
                        f"the request ran past its deadline of {self.settings.request_timeout:g}s",
                        "timeout_error",
                        code="deadline_exceeded",
                    )
                for fut in done:
                    sub = waiters.pop(fut)
                    event = fut.result()
                    self._observe(event, (id(sub), event.index), last, arrival)
                    if event.finish_reason:
                        open_choices -= 1
                        remaining[id(sub)] -= 1
                        self.metrics.finished(event.finish_reason)
                    if remaining[id(sub)]:
                        waiters[asyncio.ensure_future(sub.events.get())] = sub
                    yield sub, event
            self.metrics.e2e.observe(time.perf_counter() - arrival)
        finally:
            for fut in waiters:
                fut.cancel()
            if open_choices:
                for s in subs:
                    self.scheduler.cancel(s.state)

    def _observe(
        self, event: TokenEvent, key: tuple[int, int], last: dict[tuple[int, int], float], arrival: float
    ) -> None:
        now = time.perf_counter()
        if not event.token_ids:
            return
        self.metrics.generation_tokens.inc(len(event.token_ids))
        if key in last:
            self.metrics.itl.observe(now - last[key])
        else:
            self.metrics.ttft.observe(now - arrival)
            if event.queued_s is not None:
                self.metrics.queue_time.observe(event.queued_s)
        last[key] = now

    async def _collect(self, subs: list[Submission]) -> dict[int, Choice]:
        choices: dict[int, Choice] = {}
        async for sub, ev in self._events(subs):
            c = choices.setdefault(sub.index_base + ev.index, Choice())
            c.text += ev.text
            c.token_ids += ev.token_ids
            c.logprobs += list(ev.logprobs or ())
            if ev.prompt_logprobs is not None:
                c.prompt_logprobs = ev.prompt_logprobs
            if ev.finish_reason:
                c.finish_reason = _public_reason(ev.finish_reason)
                c.error = ev.error
        failed = [c.error for c in choices.values() if c.error]
        if failed:
            raise APIError(500, failed[0], "server_error", code="engine_error")
        return choices

    # ------------------------------------------------------------------ streaming

    async def _sse_stream(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        """Server-sent events: one `data:` line per chunk, an error chunk if the request fails midway, then [DONE]."""
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except APIError as exc:
            yield _sse(exc.body())
        yield "data: [DONE]\n\n"

    async def _stream_completion(
        self, subs: list[Submission], rid: str, created: int, echo: bool, include_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        choices: dict[int, Choice] = {}
        if echo:
            for sub in subs:
                text = self.tokenizer.decode(sub.prompt_ids)
                for i in range(sub.n):
                    yield (
                        {
                            **head,
                            "choices": [
                                {"text": text, "index": sub.index_base + i, "logprobs": None, "finish_reason": None}
                            ],
                        }
                    )
        async for sub, ev in self._events(subs):
            index = sub.index_base + ev.index
            c = choices.setdefault(index, Choice())
            c.token_ids += ev.token_ids
            if ev.error:
                yield ({"error": {"message": ev.error, "type": "server_error", "param": None, "code": "engine_error"}})
                continue
            if not ev.text and not ev.finish_reason:
                continue
            lp = self._completion_logprobs(Choice(logprobs=list(ev.logprobs)), None) if ev.logprobs else None
            yield (
                {
                    **head,
                    "choices": [
                        {
                            "text": ev.text,
                            "index": index,
                            "logprobs": lp,
                            "finish_reason": _public_reason(ev.finish_reason),
                        }
                    ],
                }
            )
        if include_usage:
            yield ({**head, "choices": [], "usage": self._usage(subs, choices)})

    async def _stream_chat(
        self, subs: list[Submission], rid: str, created: int, include_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        choices: dict[int, Choice] = {}
        for i in range(subs[0].n):
            yield (
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        async for _, ev in self._events(subs):
            c = choices.setdefault(ev.index, Choice())
            c.token_ids += ev.token_ids
            if ev.error:
                yield ({"error": {"message": ev.error, "type": "server_error", "param": None, "code": "engine_error"}})
                continue
            lp = {"content": [self._chat_logprob(x) for x in ev.logprobs]} if ev.logprobs else None
            if ev.text or lp:
                yield (
                    {
                        **head,
                        "choices": [
                            {"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}
                        ],
                    }
                )
            if ev.finish_reason:
                yield (
                    {
                        **head,
                        "choices": [
                            {
                                "index": ev.index,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": _public_reason(ev.finish_reason),
                            }
                        ],
                    }
                )
        if include_usage:
            yield ({**head, "choices": [], "usage": self._usage(subs, choices)})

    # ------------------------------------------------------------------ shapes

    def _usage(self, subs: list[Submission], choices: dict[int, Choice]) -> dict[str, int]:
        prompt = sum(len(s.prompt_ids) for s in subs)
        completion = sum(len(c.token_ids) for c in choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion_logprobs(self, c: Choice, echoed_prompt: list[int] | None) -> dict[str, Any]:
        """OpenAI's legacy logprobs object; with echo, the prompt's tokens come first (the very first has none)."""
        entries = [*(c.prompt_logprobs or ()), *c.logprobs] if echoed_prompt else list(c.logprobs)
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = 0
        for i, e in enumerate(entries):
            if e is None:  # the first prompt token has no context, hence no logprob
                tokens.append(self.tokenizer.token_text(echoed_prompt[0]) if echoed_prompt else "")
                token_lps.append(None)
                tops.append(None)
            else:
                tokens.append(e.text)
                token_lps.append(e.logprob)
                tops.append({t: lp for _, t, lp in e.top})
            offsets.append(offset)
            offset += len(tokens[i])
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    @staticmethod
    def _chat_logprob(lp: TokenLogprob) -> dict[str, Any]:
        return {
            "token": lp.text,
            "logprob": lp.logprob,
            "bytes": list(lp.text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for _, t, v in lp.top],
        }


def _public_reason(reason: str | None) -> str | None:
    return {"cancelled": "stop", "error": "error"}.get(reason, reason) if reason else None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

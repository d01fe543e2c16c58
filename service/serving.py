"""Thin endpoint handlers: validate, submit through the engine client, shape one JSON response or the SSE stream."""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from service.client import ChoiceEvent, ClientGone, EngineClient, Generation
from service.config import Settings
from service.errors import APIError, model_not_found
from service.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
)
from service.sequence import TokenLogprob
from service.tokenizer import TextTokenizer
from service.validation import Validator

SSE_KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"
Chunk = dict[str, Any] | str | None  # a chunk to encode, an SSE frame already rendered, or None for a keep-alive
TEXT = "\x00text\x00"  # a chunk's text in a frame's template (its JSON, "\\u0000text\\u0000", has no other source)


class TextFrames:
    """The SSE frames of one stream's plain-text chunks (no logprobs, no finish reason: nearly every chunk), from a
    template per choice: the full chunk rendered once with the placeholder TEXT, so that each token JSON-encodes only
    its text (building and dumping the pydantic chunk per token took a quarter of the event loop's time per token).
    `render(index, text)` is the chunk itself; a frame equals `data: {json.dumps(render(index, text))}`."""

    def __init__(self, render: Callable[[int, str], dict[str, Any]]) -> None:
        self.render = render
        self.parts: dict[int, tuple[str, str]] = {}  # choice index -> (frame before the text, after it)

    def __call__(self, index: int, text: str) -> str:
        parts = self.parts.get(index)
        if parts is None:  # the text field comes after id and model, so the last match is the placeholder
            head, _, tail = json.dumps(self.render(index, TEXT), ensure_ascii=False).rpartition(json.dumps(TEXT))
            parts = self.parts[index] = (f"data: {head}", f"{tail}\n\n")
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


class TextOffsets:
    """Legacy logprobs' `text_offset`: where each token's text begins in its choice's text. A token counts the
    characters it completes (a character split over tokens counts at its last one); a special token counts none,
    as the text skips it."""

    def __init__(self) -> None:
        self.at = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def advance(self, raw: bytes, shown: bool) -> int:
        """The offset of a token of these bytes; the next token's begins after the characters it completes. An
        unfinished character this token breaks off shows as one U+FFFD before it (as a decode writes it)."""
        if not shown or not raw:
            return self.at
        pending = self._utf8.getstate()[0]
        start = self.at + (1 if pending and not 0x80 <= raw[0] <= 0xBF else 0)
        self.at += len(self._utf8.decode(raw))
        return start


@dataclass
class Choice:
    """What one choice accumulated: text, tokens, logprobs, how it ended; `offsets` is where its text stands."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    offsets: TextOffsets = field(default_factory=TextOffsets)  # legacy logprobs: its tokens' text_offset
    cached_tokens: int = 0  # of its prompt, the tokens the prefix cache held


class OpenAIServing:
    def __init__(
        self, settings: Settings, validator: Validator, client: EngineClient, tokenizer: TextTokenizer, model: str
    ) -> None:
        self.settings, self.validator, self.client, self.tokenizer, self.model = (
            settings,
            validator,
            client,
            tokenizer,
            model,
        )

    # ------------------------------------------------------------------ endpoints

    async def completions(self, req: CompletionRequest, http: Request) -> dict[str, Any] | AsyncIterator[str]:
        self.client.check_admission()
        gen = self.client.submit(self.validator.completion(req))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return self._sse(self._completion_chunks(gen, req, rid, created))
        choices = await self._collect(gen, http)
        out = []
        for index in sorted(choices):
            c = choices[index]
            prompt = gen.prompts[index // gen.valid.n]
            text = (self.tokenizer.prompt_text(list(prompt)) if req.echo else "") + c.text
            lp = self._completion_logprobs(c.logprobs, TextOffsets(), prompt) if req.logprobs is not None else None
            out.append(CompletionChoice(text=text, index=index, logprobs=lp, finish_reason=c.finish_reason))
        usage = self._usage(gen, choices)
        return CompletionResponse(id=rid, created=created, model=self.model, choices=out, usage=usage).model_dump()

    async def chat(self, req: ChatCompletionRequest, http: Request) -> dict[str, Any] | AsyncIterator[str]:
        self.client.check_admission()
        gen = self.client.submit(self.validator.chat(req))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return self._sse(self._chat_chunks(gen, req, rid, created))
        choices = await self._collect(gen, http)
        out = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=self._chat_logprobs(c.logprobs) if req.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for i, c in sorted(choices.items())
        ]
        usage = self._usage(gen, choices)
        return ChatCompletionResponse(id=rid, created=created, model=self.model, choices=out, usage=usage).model_dump()

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
        if req.messages is not None:
            ids = self.validator.chat_prompt(req.messages, req.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(req.prompt or "")
        return TokenizeResponse(count=len(ids), max_model_len=self.validator.max_model_len, tokens=ids).model_dump()

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model)
        self.validator.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens)).model_dump()

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise model_not_found(model)

    # ------------------------------------------------------------------ one response

    async def _collect(self, gen: Generation, http: Request) -> dict[int, Choice]:
        """All events of a non-streamed request; a client that hangs up cancels it (its slots free within a step)."""
        gone = asyncio.ensure_future(_disconnected(http))
        choices: dict[int, Choice] = {}
        try:
            async for ce in gen.events(gone=gone):
                if ce is not None:
                    _accumulate(choices.setdefault(ce.index, Choice()), ce)
        except ClientGone as exc:
            raise APIError(499, "the client closed the request", code="client_closed_request") from exc
        finally:
            gone.cancel()
        failed = [c.error for c in choices.values() if c.error]
        if failed:
            raise APIError(500, failed[0], "server_error", code="engine_error")
        return choices

    # ------------------------------------------------------------------ streams

    async def _sse(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
        """Server-sent events: a `data:` line per chunk, a comment per keep-alive, an error chunk if the request
        fails midway, then [DONE]. Leaving (the client hung up) cancels the request."""
        try:
            async for chunk in chunks:
                if chunk is None:
                    yield SSE_KEEPALIVE
                else:
                    yield chunk if isinstance(chunk, str) else f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield DONE

    def _events(self, gen: Generation) -> AsyncIterator[ChoiceEvent | None]:
        return gen.events(keepalive=self.settings.sse_keepalive)

    async def _completion_chunks(
        self, gen: Generation, req: CompletionRequest, rid: str, created: int
    ) -> AsyncIterator[Chunk]:
        choices: dict[int, Choice] = {}
        usage_field = {"usage": None} if req.include_usage else {}

        def render(index: int, text: str, lp: CompletionLogprobs | None = None, reason: str | None = None) -> dict:
            choice = CompletionChoice(text=text, index=index, logprobs=lp, finish_reason=reason)
            body = CompletionResponse(id=rid, created=created, model=self.model, choices=[choice])
            return {**body.model_dump(exclude={"usage"}), **usage_field}

        frames = TextFrames(render)
        async for ce in self._events(gen):
            if ce is None:
                yield None
                continue
            ev, first = ce.event, ce.index not in choices
            c = choices.setdefault(ce.index, Choice())
            new = len(c.logprobs)
            _accumulate(c, ce)
            if ev.error:
                raise APIError(500, ev.error, "server_error", code="engine_error")
            prompt = gen.prompts[ce.prompt]
            text = ev.text
            if first and req.echo:  # the echoed prompt leads the choice's first chunk, its logprobs too
                text = self.tokenizer.prompt_text(list(prompt)) + text
            lp = None
            if req.logprobs is not None:  # offsets go on from where the last chunk's stopped
                lp = self._completion_logprobs(c.logprobs[new:], c.offsets, prompt)
            if not text and not ev.finish_reason and not (lp and lp.tokens):
                continue
            if lp is None and c.finish_reason is None:
                yield frames(ce.index, text)
            else:
                yield render(ce.index, text, lp, c.finish_reason)
        if req.include_usage:
            usage = self._usage(gen, choices)
            yield CompletionResponse(id=rid, created=created, model=self.model, choices=[], usage=usage).model_dump()

    async def _chat_chunks(
        self, gen: Generation, req: ChatCompletionRequest, rid: str, created: int
    ) -> AsyncIterator[Chunk]:
        choices: dict[int, Choice] = {}
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(index: int, delta: Delta, lp: ChatLogprobs | None = None, reason: str | None = None) -> dict:
            c = ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=reason)
            body = ChatCompletionChunk(id=rid, created=created, model=self.model, choices=[c]).model_dump(
                exclude={"usage"}
            )
            body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
            return {**body, **usage_field}

        frames = TextFrames(lambda index, text: chunk(index, Delta(content=text)))
        for i in range(gen.valid.n):
            yield chunk(i, Delta(role="assistant", content=""))
        async for ce in self._events(gen):
            if ce is None:
                yield None
                continue
            ev = ce.event
            c = choices.setdefault(ce.index, Choice())
            _accumulate(c, ce)
            if ev.error:
                raise APIError(500, ev.error, "server_error", code="engine_error")
            lp = self._chat_logprobs(list(ev.logprobs)) if req.logprobs and ev.logprobs else None
            if lp:
                yield chunk(ce.index, Delta(content=ev.text), lp)
            elif ev.text:
                yield frames(ce.index, ev.text)
            if ev.finish_reason:
                yield chunk(ce.index, Delta(), None, c.finish_reason)
        if req.include_usage:
            usage = self._usage(gen, choices)
            yield ChatCompletionChunk(id=rid, created=created, model=self.model, choices=[], usage=usage).model_dump()

    # ------------------------------------------------------------------ shapes

    def _usage(self, gen: Generation, choices: dict[int, Choice]) -> Usage:
        prompt = sum(len(p) for p in gen.prompts)  # each prompt once, whatever n (as OpenAI and vLLM count)
        completion = sum(len(c.token_ids) for c in choices.values())
        n = gen.valid.n  # a prompt's cached tokens: those of its first choice
        cached = sum(choices[i].cached_tokens for i in range(0, len(gen.prompts) * n, n) if i in choices)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def _completion_logprobs(
        self, entries: list[TokenLogprob | None], offsets: TextOffsets, prompt: tuple[int, ...]
    ) -> CompletionLogprobs:
        """OpenAI's legacy logprobs object, its offsets going on from `offsets`; with echo, the prompt's entries come
        first (None for the very first prompt token, which has no context)."""
        out = CompletionLogprobs()
        tok = self.tokenizer
        for e in entries:
            if e is None:
                token_id = prompt[0]
                out.tokens.append(tok.token_text(token_id))
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                token_id = e.token_id
                out.tokens.append(e.text)
                out.token_logprobs.append(e.logprob)
                out.top_logprobs.append({t: lp for _, t, lp in e.top})
            out.text_offset.append(offsets.advance(tok.token_bytes(token_id), tok.shows(token_id)))
        return out

    def _chat_logprobs(self, entries: list[TokenLogprob | None]) -> ChatLogprobs:
        raw = self.tokenizer.token_bytes
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=e.text,
                    logprob=e.logprob,
                    bytes=list(raw(e.token_id)),
                    top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(raw(i))) for i, t, v in e.top],
                )
                for e in entries
                if e is not None
            ]
        )


def _accumulate(c: Choice, ce: ChoiceEvent) -> None:
    ev = ce.event
    if ev.prompt_logprobs is not None:  # echo: the prompt's entries lead the choice's list
        c.logprobs[:0] = list(ev.prompt_logprobs)
    if ev.cached_tokens is not None:
        c.cached_tokens = ev.cached_tokens
    c.text += ev.text
    c.token_ids += ev.token_ids
    c.logprobs += list(ev.logprobs or ())
    if ev.finish_reason:
        c.finish_reason = _public_reason(ev.finish_reason)
        c.error = ev.error


def _public_reason(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


async def _disconnected(http: Request) -> None:
    """Returns when the client hangs up (the body was read already, so the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass

"""The async side of the engine thread: admission, submit, the stream of events per request, deadline, cancel,
and the request metrics. The endpoint handlers see only this; the scheduler sees only plain requests and sinks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from service.errors import APIError, engine_unavailable, overloaded
from service.metrics import Metrics
from service.scheduler import EngineStopped, QueueFull
from service.sequence import GenerationRequest, RequestState, Sink, TokenEvent
from service.validation import ValidRequest


class SchedulerLike(Protocol):
    """What the client needs of the scheduler (a fake one in unit tests)."""

    @property
    def alive(self) -> bool: ...

    def saturated(self) -> bool: ...

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestState: ...

    def cancel(self, state: RequestState) -> None: ...


class ClientGone(Exception):
    """The HTTP client hung up; the request was cancelled."""


@dataclass(frozen=True)
class ChoiceEvent:
    """An event of choice `index` of the whole request (prompt i, sample j -> index i * n + j)."""

    index: int
    prompt: int  # which prompt of the request
    event: TokenEvent


KEEPALIVE = None  # what `Generation.events` yields when nothing happened for a keep-alive interval


class Generation:
    """One submitted request: its prompts' scheduler states and the queue their events arrive on."""

    def __init__(self, client: EngineClient, valid: ValidRequest) -> None:
        self.client, self.valid = client, valid
        self.submitted = time.perf_counter()
        self.states: list[RequestState] = []
        self.inbox: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()  # (prompt, event), from the engine thread
        self.open = len(valid.prompts) * valid.n  # choices without their final event yet

    @property
    def prompts(self) -> tuple[tuple[int, ...], ...]:
        return self.valid.prompts

    def cancel(self) -> None:
        for state in self.states:
            self.client.scheduler.cancel(state)

    async def events(
        self, keepalive: float | None = None, gone: asyncio.Future[None] | None = None
    ) -> AsyncIterator[ChoiceEvent | None]:
        """Every choice's events as they come, until each has its final one. Yields None (KEEPALIVE) after
        `keepalive` seconds without one; raises APIError 504 past the deadline and ClientGone when `gone` is done.
        Leaving early, for whatever reason, cancels the request (the scheduler frees its slots within a step)."""
        metrics, n = self.client.metrics, self.valid.n
        deadline = self.submitted + self.client.request_timeout
        last: dict[int, float] = {}
        getter: asyncio.Future[tuple[int, TokenEvent]] | None = None
        try:
            while self.open:
                left = deadline - time.perf_counter()
                if left <= 0:
                    metrics.finished("timeout")
                    raise APIError(
                        504,
                        f"the request ran past its deadline of {self.client.request_timeout:g}s",
                        "timeout_error",
                        code="deadline_exceeded",
                    )
                getter = getter or asyncio.ensure_future(self.inbox.get())
                waiting: set[asyncio.Future] = {getter} if gone is None else {getter, gone}
                timeout = left if keepalive is None else min(left, keepalive)
                done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if gone is not None and gone in done:
                    raise ClientGone()
                if getter not in done:
                    if keepalive is not None and deadline - time.perf_counter() > 0:
                        yield KEEPALIVE
                    continue
                prompt, event = getter.result()
                getter = None
                index = prompt * n + event.index
                self._observe(event, index, last)
                if event.finish_reason:
                    self.open -= 1
                    metrics.finished(event.finish_reason)
                yield ChoiceEvent(index, prompt, event)
            metrics.e2e.observe(time.perf_counter() - self.submitted)
        finally:
            if getter is not None:
                getter.cancel()
            if self.open:
                self.cancel()

    def _observe(self, event: TokenEvent, index: int, last: dict[int, float]) -> None:
        if not event.token_ids:
            return
        now, metrics = time.perf_counter(), self.client.metrics
        metrics.generation_tokens.inc(len(event.token_ids))
        if index in last:
            metrics.itl.observe(now - last[index])
        else:
            metrics.ttft.observe(now - self.submitted)
            if event.queued_s is not None:
                metrics.queue_time.observe(event.queued_s)
        last[index] = now


class EngineClient:
    def __init__(self, scheduler: SchedulerLike, metrics: Metrics, request_timeout: float) -> None:
        self.scheduler, self.metrics, self.request_timeout = scheduler, metrics, request_timeout

    def check_admission(self) -> None:
        """Before any tokenization: is the engine alive, and is there room in the waiting queue?"""
        if not self.scheduler.alive:
            raise engine_unavailable()
        if self.scheduler.saturated():
            raise overloaded("the waiting queue is full")

    def submit(self, valid: ValidRequest) -> Generation:
        """Queues every prompt of the request; all or nothing."""
        loop = asyncio.get_running_loop()
        gen = Generation(self, valid)
        queue = gen.inbox

        def sink_for(prompt: int) -> Sink:
            def sink(event: TokenEvent) -> None:
                if event.finish_reason == "cancelled":  # the slot is already free when this arrives
                    self.metrics.finished("abort")
                if not loop.is_closed():  # nobody listens any more once the loop is gone
                    loop.call_soon_threadsafe(queue.put_nowait, (prompt, event))

            return sink

        try:
            for i, prompt in enumerate(valid.prompts):
                request = GenerationRequest(uuid.uuid4().hex, prompt, valid.params, valid.n, valid.prompt_logprobs)
                gen.states.append(self.scheduler.submit(request, sink_for(i)))
                self.metrics.prompt_tokens.inc(len(prompt) * valid.n)
        except QueueFull as exc:
            gen.cancel()
            raise overloaded(str(exc)) from exc
        except EngineStopped as exc:
            gen.cancel()
            raise engine_unavailable(str(exc)) from exc
        return gen

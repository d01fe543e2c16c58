"""The async side of the engine thread: admission, submit, the stream of events per request, deadline, cancel,
and the request metrics. The endpoint handlers see only this; the scheduler sees only plain requests and sinks.
"""

from __future__ import annotations

import asyncio
import threading
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


class _Gone:
    """What a request's inbox receives when its HTTP client hangs up."""


class _Tick:
    """What a request's inbox receives from its timer: a keep-alive or the deadline may be due."""


_GONE, _TICK = _Gone(), _Tick()


class Generation:
    """One submitted request: its prompts' scheduler states and the queue their events arrive on."""

    def __init__(self, client: EngineClient, valid: ValidRequest) -> None:
        self.client, self.valid = client, valid
        self.submitted = time.perf_counter()
        self.states: list[RequestState] = []
        self.inbox: asyncio.Queue[tuple[int, TokenEvent] | _Gone | _Tick] = asyncio.Queue()  # (prompt, event) or not
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
        Leaving early, for whatever reason, cancels the request (the scheduler frees its slots within a step).
        One timer per request wakes the wait when a keep-alive or the deadline is due (a timeout around each wait
        took about a third of the event loop's time per token of a non-streamed request)."""
        metrics, n = self.client.metrics, self.valid.n
        deadline = self.submitted + self.client.request_timeout
        last: dict[int, float] = {}
        loop = asyncio.get_running_loop()
        quiet = time.perf_counter()  # since the last event or keep-alive
        timer: asyncio.TimerHandle | None = None

        def arm(now: float) -> None:
            nonlocal timer
            due = deadline if keepalive is None else min(deadline, quiet + keepalive)
            timer = loop.call_later(max(0.0, due - now), self.inbox.put_nowait, _TICK)

        if gone is not None:  # the hang-up arrives through the inbox, like any event
            gone.add_done_callback(lambda f: None if f.cancelled() else self.inbox.put_nowait(_GONE))
        try:
            arm(quiet)
            while self.open:
                item = await self.inbox.get() if self.inbox.empty() else self.inbox.get_nowait()
                now = time.perf_counter()
                if now >= deadline:
                    metrics.finished("timeout")
                    raise APIError(
                        504,
                        f"the request ran past its deadline of {self.client.request_timeout:g}s",
                        "timeout_error",
                        code="deadline_exceeded",
                    )
                if isinstance(item, _Tick):  # early (an event came since it was set) or a keep-alive is due
                    if keepalive is not None and now - quiet >= keepalive:
                        quiet = now
                        yield KEEPALIVE
                    arm(now)
                    continue
                if isinstance(item, _Gone):
                    raise ClientGone()
                quiet = now
                prompt, event = item
                index = prompt * n + event.index
                self._observe(event, index, last)
                if event.finish_reason:
                    self.open -= 1
                    metrics.finished(event.finish_reason)
                yield ChoiceEvent(index, prompt, event)
            metrics.e2e.observe(time.perf_counter() - self.submitted)
        finally:
            if timer is not None:
                timer.cancel()
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
        # Events from the engine thread not yet handed to their event loop: one wake-up of the loop carries every
        # event posted before it runs (a decode step of 16 streams wakes it once, not 16 times).
        self._outboxes: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        self._outbox_lock = threading.Lock()

    def _post(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue, item: object) -> None:
        """Engine thread: queue `item` for `inbox`; the first item of a batch schedules its delivery."""
        if loop.is_closed():  # nobody listens any more
            return
        with self._outbox_lock:
            box = self._outboxes.setdefault(loop, [])
            box.append((inbox, item))
            if len(box) > 1:
                return
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # the loop is closed: nobody listens any more
            with self._outbox_lock:
                self._outboxes.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """Event loop: every item posted so far into its inbox, in order."""
        with self._outbox_lock:
            batch = self._outboxes.pop(loop, [])
        for inbox, item in batch:
            inbox.put_nowait(item)

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
                self._post(loop, queue, (prompt, event))

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

"""The engine client against a fake scheduler: events in order per choice, deadline, keep-alives, cancel, metrics."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.client import ClientGone, EngineClient
from service.errors import APIError
from service.metrics import Metrics
from service.sampler import SamplingParams
from service.scheduler import EngineStopped, QueueFull
from service.sequence import GenerationRequest, RequestState, Sink, TokenEvent
from service.validation import ValidRequest


class FakeScheduler:
    """Plays a script of events per submitted request from a thread of its own, as the engine loop would."""

    def __init__(self, script=None, refuse=None) -> None:
        self.script, self.refuse = script or [], refuse
        self.alive, self.busy = True, False
        self.submitted: list[RequestState] = []
        self.cancelled: list[RequestState] = []
        self.release = threading.Event()

    def saturated(self) -> bool:
        return self.busy

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestState:
        if self.refuse is not None and len(self.submitted) == 1:
            raise self.refuse
        state = RequestState(request, sink)
        self.submitted.append(state)
        threading.Thread(target=self._play, args=(state,), daemon=True).start()
        return state

    def cancel(self, state: RequestState) -> None:
        state.cancelled = True
        self.cancelled.append(state)
        self.release.set()

    def _play(self, state: RequestState) -> None:
        for event in self.script:
            if event is None:  # pause until cancelled or released
                self.release.wait(10)
                if state.cancelled:
                    state.sink(TokenEvent(0, "", (), None, finish_reason="cancelled"))
                    return
                continue
            state.sink(event)


def valid(prompts=((1, 2),), n=1) -> ValidRequest:
    return ValidRequest(prompts, SamplingParams(max_tokens=4), n)


def tokens(texts, n=1, reason="length"):
    out = []
    for i in range(n):
        for k, t in enumerate(texts):
            last = k == len(texts) - 1
            out.append(TokenEvent(i, t, (k,), None, finish_reason=reason if last else None, queued_s=0.0))
    return out


def metric(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, {"model_name": "m", **labels})
    return value or 0.0


async def drain(gen, **kw):
    return [e async for e in gen.events(**kw)]


def test_events_per_choice_and_metrics():
    fake = FakeScheduler(tokens(["a", "b", "c"], n=2))
    metrics = Metrics("m")
    client = EngineClient(fake, metrics, request_timeout=30)

    async def go():
        gen = client.submit(valid(prompts=((1, 2), (3,)), n=2))
        return await drain(gen)

    events = asyncio.run(go())
    # two prompts, n=2 each: choice index = prompt * n + sample
    assert sorted({e.index for e in events}) == [0, 1, 2, 3]
    for index in range(4):
        assert "".join(e.event.text for e in events if e.index == index) == "abc"
        assert [e.event.finish_reason for e in events if e.index == index][-1] == "length"
    assert metric(metrics, "generation_tokens_total") == 12
    assert metric(metrics, "prompt_tokens_total") == (2 + 1) * 2
    assert metric(metrics, "request_success_total", finished_reason="length") == 4
    assert fake.cancelled == []  # finished requests are not cancelled


def test_leaving_early_cancels_and_the_scheduler_reports_the_abort():
    fake = FakeScheduler([*tokens(["a"], reason=None), None])
    metrics = Metrics("m")
    client = EngineClient(fake, metrics, request_timeout=30)

    async def go():
        gen = client.submit(valid())
        async for e in gen.events():
            assert e.event.text == "a"
            break  # the client hangs up after the first token
        await asyncio.sleep(0)

    asyncio.run(go())
    assert fake.cancelled == fake.submitted
    fake.release.wait(5)
    for _ in range(100):  # the fake's thread sends the cancelled event after the release
        if metric(metrics, "request_success_total", finished_reason="abort"):
            break
        threading.Event().wait(0.01)
    assert metric(metrics, "request_success_total", finished_reason="abort") == 1


def test_a_gone_client_raises_and_cancels():
    fake = FakeScheduler([None])
    client = EngineClient(fake, Metrics("m"), request_timeout=30)

    async def go():
        gone = asyncio.get_running_loop().create_future()
        gen = client.submit(valid())
        asyncio.get_running_loop().call_soon(gone.set_result, None)
        await drain(gen, gone=gone)

    with pytest.raises(ClientGone):
        asyncio.run(go())
    assert fake.cancelled == fake.submitted


def test_deadline_and_keepalives():
    fake = FakeScheduler([None])
    metrics = Metrics("m")
    client = EngineClient(fake, metrics, request_timeout=0.2)

    async def go():
        seen = []
        with pytest.raises(APIError) as exc:
            async for e in client.submit(valid()).events(keepalive=0.05):
                seen.append(e)
        return seen, exc.value

    seen, err = asyncio.run(go())
    assert err.status == 504 and err.code == "deadline_exceeded"
    assert seen and all(e is None for e in seen)  # keep-alives while nothing came
    assert fake.cancelled == fake.submitted
    assert metric(metrics, "request_success_total", finished_reason="timeout") == 1


class PacedScheduler(FakeScheduler):
    """Plays its script with `pace` seconds before each event (a pause of `gap` before the last)."""

    def __init__(self, script, pace: float, gap: float) -> None:
        super().__init__(script)
        self.pace, self.gap = pace, gap

    def _play(self, state: RequestState) -> None:
        for k, event in enumerate(self.script):
            time.sleep(self.gap if k == len(self.script) - 1 else self.pace)
            state.sink(event)


@pytest.mark.parametrize(("gap", "keepalives"), [(0.01, False), (0.35, True)])
def test_keepalives_only_when_events_stop_for_an_interval(gap, keepalives):
    """Events 10 ms apart (a tenth of the interval) bring no keep-alive; a pause of 3.5 intervals brings some."""
    client = EngineClient(PacedScheduler(tokens(["a"] * 12), 0.01, gap), Metrics("m"), request_timeout=10)

    async def go():
        return await drain(client.submit(valid()), keepalive=0.1)

    seen = asyncio.run(go())
    assert [e.event.text for e in seen if e is not None] == ["a"] * 12
    assert (None in seen) == keepalives and seen[-1] is not None and seen.count(None) <= 4


@pytest.mark.parametrize(
    ("refusal", "status", "code"), [(QueueFull("full"), 429, "overloaded"), (EngineStopped("x"), 503, None)]
)
def test_a_refused_prompt_cancels_the_others_and_maps_to_an_api_error(refusal, status, code):
    fake = FakeScheduler([None], refuse=refusal)
    client = EngineClient(fake, Metrics("m"), request_timeout=30)

    async def go():
        client.submit(valid(prompts=((1,), (2,))))

    with pytest.raises(APIError) as exc:
        asyncio.run(go())
    assert exc.value.status == status and (code is None or exc.value.code == code)
    assert fake.cancelled == fake.submitted and len(fake.submitted) == 1


def test_admission():
    fake = FakeScheduler()
    client = EngineClient(fake, Metrics("m"), request_timeout=30)
    client.check_admission()
    fake.busy = True
    with pytest.raises(APIError) as exc:
        client.check_admission()
    assert exc.value.status == 429
    fake.alive = False
    with pytest.raises(APIError) as exc:
        client.check_admission()
    assert exc.value.status == 503 and exc.value.code == "engine_unavailable"


def test_events_posted_before_the_loop_runs_arrive_in_one_wake_up_in_order():
    client = EngineClient(FakeScheduler(), Metrics("m"), request_timeout=30)

    async def go():
        loop = asyncio.get_running_loop()
        inboxes = [asyncio.Queue(), asyncio.Queue()]
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakes.append(a) or real(*a)  # type: ignore[method-assign]
        # the engine thread posts a step's events while the loop is busy elsewhere (here: not yet yielded to)
        poster = threading.Thread(target=lambda: [client._post(loop, inboxes[i % 2], i) for i in range(6)])
        poster.start()
        poster.join()
        await asyncio.sleep(0)
        got = [[q.get_nowait() for _ in range(q.qsize())] for q in inboxes]
        client._post(loop, inboxes[0], 6)  # the next batch wakes the loop again
        await asyncio.sleep(0)
        return len(wakes), got, inboxes[0].get_nowait()

    wakes, got, later = asyncio.run(go())
    assert wakes == 2 and got == [[0, 2, 4], [1, 3, 5]] and later == 6

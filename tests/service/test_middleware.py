"""The admission gate at the ASGI level: refusals first, whatever the admitted requests go on to do."""

from __future__ import annotations

import asyncio

from service.middleware import AdmissionGate


def test_in_a_burst_the_refused_are_answered_before_any_admitted_request_starts_its_work():
    order: list[str] = []

    async def app(scope, receive, send):  # the admitted request's work (body, validation, tokenization, ...)
        order.append(f"work {scope['i']}")
        await send({"type": "http.response.start", "status": 200, "headers": []})

    gate = AdmissionGate(app, limit=3, paths=("/v1/completions",))

    async def request(i: int) -> None:
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                order.append(f"{message['status']} {i}")

        for _ in range(i):  # one arrival per event-loop pass, as a burst's connections are read
            await asyncio.sleep(0)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "i": i}
        await gate(scope, receive, send)

    async def burst():
        await asyncio.gather(*(request(i) for i in range(8)))

    asyncio.run(burst())
    refused = [k for k, entry in enumerate(order) if entry.startswith("429")]
    work = [k for k, entry in enumerate(order) if entry.startswith("work")]
    assert len(refused) == 5 and len(work) == 3 and max(refused) < min(work), order
    assert gate.in_flight == 0

"""Locust users for the OpenAI-compatible API: streaming completions and chat with exact prompt/output lengths.

Each request reports extra locust entries beside the HTTP one, so locust's statistics, CSV and HTML report show them:
  TTFT  <endpoint>   time to the first streamed token (ms)
  ITL   <endpoint>   every gap between streamed token chunks (ms)
  E2E   <endpoint>   whole request (ms); its response_length is the number of output tokens
A request that fails, errors mid-stream, or returns fewer tokens than asked counts as a failure.

Settings (environment): LOADTEST_PROMPT_TOKENS (128), LOADTEST_OUTPUT_TOKENS (128), LOADTEST_ENDPOINT
(completions | chat | mixed, default completions), LOADTEST_MODEL (first model of /v1/models), LOADTEST_API_KEY,
LOADTEST_STREAM (1), LOADTEST_PROMPTS (64 distinct prompts).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, events, task

PROMPT_TOKENS = int(os.environ.get("LOADTEST_PROMPT_TOKENS", "128"))
OUTPUT_TOKENS = int(os.environ.get("LOADTEST_OUTPUT_TOKENS", "128"))
ENDPOINT = os.environ.get("LOADTEST_ENDPOINT", "completions")
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
STREAM = os.environ.get("LOADTEST_STREAM", "1") == "1"
N_PROMPTS = int(os.environ.get("LOADTEST_PROMPTS", "64"))
WORDS = (
    "river mountain computer program history writing soup onion carrot bread market bridge children summer "
    "weather harvest language compiler library number machine instruction garden window morning"
).split()


def prompt_ids(i: int) -> list[int]:
    """Exactly PROMPT_TOKENS token ids, distinct per i (ids from the common part of any vocabulary: 300..20000)."""
    rng = random.Random(i)
    return [rng.randrange(300, 20000) for _ in range(PROMPT_TOKENS)]


def prompt_text(i: int) -> str:
    """About PROMPT_TOKENS tokens of text (one common English word is about one token)."""
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(max(PROMPT_TOKENS - 30, 1)))


@events.init_command_line_parser.add_listener
def _(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--model-name", default=os.environ.get("LOADTEST_MODEL", ""), help="model id to request")


class OpenAIUser(HttpUser):
    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        self.model = self.environment.parsed_options.model_name if self.environment.parsed_options else ""
        if not self.model:
            self.model = self.client.get("/v1/models", headers=self.headers).json()["data"][0]["id"]

    @task
    def generate(self) -> None:
        endpoint = ENDPOINT if ENDPOINT != "mixed" else random.choice(["completions", "chat"])
        i = random.randrange(N_PROMPTS)
        body: dict = {
            "model": self.model,
            "max_tokens": OUTPUT_TOKENS,
            "min_tokens": OUTPUT_TOKENS,
            "ignore_eos": True,
            "temperature": 0,
            "stream": STREAM,
        }
        if STREAM:
            body["stream_options"] = {"include_usage": True}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt_text(i)}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = prompt_ids(i)
            path = "/v1/completions"
        self._request(path, endpoint, body)

    def _request(self, path: str, name: str, body: dict) -> None:
        start = time.perf_counter()
        first: float | None = None
        last = start
        tokens = 0
        error = None
        with self.client.post(
            path, json=body, headers=self.headers, stream=STREAM, catch_response=True, name=path
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            if not STREAM:
                tokens = resp.json()["usage"]["completion_tokens"]
                first = last = time.perf_counter()
            else:
                for line in resp.iter_lines():
                    if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"].get("message", "stream error")
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if not chunk.get("choices"):
                        continue
                    c = chunk["choices"][0]
                    if c.get("text") or (c.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            self._report("TTFT", name, now - start)
                        else:
                            self._report("ITL", name, now - last)
                        last = now
            if error is None and tokens < OUTPUT_TOKENS:
                error = f"{tokens} output tokens, asked for {OUTPUT_TOKENS}"
            if error:
                resp.failure(error)
                return
            resp.success()
        self._report("E2E", name, time.perf_counter() - start, length=tokens)

    def _report(self, kind: str, name: str, seconds: float, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=None,
            context={},
        )

"""Continuous (iteration-level) batching over the engine, on one thread of its own.

Design note. Every engine step reads top to bottom:

    retire cancelled -> admit -> prefill -> decode -> sample -> emit -> retire finished

Each sequence owns one KV-cache slot from admission to retirement. Waiting sequences are admitted FIFO whenever a
slot is free, without waiting for the batch to drain. Prefill runs at most `prefill_chunk` prompt tokens per step
(one sequence at a time, batch 1, continuing where the last chunk stopped), so running streams keep getting a token
every step while long prompts are read. Decode runs every sequence that is past its prompt in one graph call over
the contiguous slot range that holds them; slots in that range that are not decoding (free, or mid-prefill) ride
along with a dummy token written at their own next position, which their next real write overwrites. Nothing in
the cache is ever copied or compacted.

The scheduler sees plain frozen dataclasses and numpy arrays; it knows nothing of HTTP or pydantic. Results leave
through each request's `sink` (called on this thread; the HTTP layer hands them to its event loop).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from service.engine import Engine
from service.grammar import Grammars
from service.sampler import log_softmax, sample, top_logprobs
from service.sequence import (
    GenerationRequest,
    RequestState,
    Sequence,
    Sink,
    StopCriteria,
    TokenEvent,
    TokenLogprob,
)
from service.tokenizer import IncrementalDetokenizer, TextTokenizer

__all__ = ["EngineStopped", "GenerationRequest", "QueueFull", "RequestState", "Scheduler", "TokenEvent"]

log = logging.getLogger(__name__)

PROMPT_TAIL = 4  # prompt tokens given to each detokenizer so the first output token decodes in context


Job = Callable[[], None]  # work for the engine thread between two steps (an inspection); must not raise


class SchedulerError(Exception):
    """Raised to the submitter when a request cannot be queued."""


class QueueFull(SchedulerError):
    """The waiting queue is at its bound (requests or prompt tokens): try again later."""


class EngineStopped(SchedulerError):
    """The engine loop is not running: nothing can be served until the process restarts."""


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        tokenizer: TextTokenizer,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        prefill_chunk: int,
        max_waiting: int = 1024,
        max_queued_tokens: int = 1 << 30,
        grammars: Grammars | None = None,
    ) -> None:
        self.engine, self.tokenizer, self.eos_ids = engine, tokenizer, frozenset(eos_token_ids)
        self.grammars = grammars
        self.max_model_len, self.prefill_chunk, self.max_waiting = max_model_len, prefill_chunk, max_waiting
        self.max_queued_tokens = max_queued_tokens
        self.queued_tokens = 0  # prompt tokens of sequences not yet admitted
        self._queue_lock = threading.Lock()
        self._failed = False
        self.cache = engine.cache
        self._incoming: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self._jobs: queue.SimpleQueue[tuple[Job, int]] = queue.SimpleQueue()  # (job, prompt tokens it holds)
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ called from other threads

    def saturated(self) -> bool:
        return self.num_waiting >= self.max_waiting or self.queued_tokens >= self.max_queued_tokens

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestState:
        """Queues a validated request (service.validation made its limits hold) as n sequences."""
        assert len(request.prompt_ids) + request.params.max_tokens <= self.max_model_len, "validation let it through"
        if not self.alive:
            raise EngineStopped("the engine loop is not running")
        tokens = len(request.prompt_ids) * request.n
        with self._queue_lock:
            if self.num_waiting + request.n > self.max_waiting:
                raise QueueFull(f"{self.num_waiting} sequences are waiting (limit {self.max_waiting})")
            if self.queued_tokens + tokens > self.max_queued_tokens:
                raise QueueFull(f"{self.queued_tokens} prompt tokens are waiting (limit {self.max_queued_tokens})")
            self.queued_tokens += tokens
        state = RequestState(request, sink)
        prompt = np.asarray(request.prompt_ids, dtype=np.int64)
        p = request.params
        stop = StopCriteria(self.eos_ids, p.max_tokens, self.cache.max_len, p.min_tokens, p.ignore_eos)
        for i in range(request.n):
            rng = np.random.default_rng(None if p.seed is None else [p.seed, i])
            detok = IncrementalDetokenizer(self.tokenizer, list(p.stop), list(prompt[-PROMPT_TAIL:]))
            constraint = self.grammars.matcher(p.grammar) if p.grammar is not None and self.grammars else None
            self._incoming.put(Sequence(state, i, prompt, rng, detok, stop, constraint))
        self._wake.set()
        return state

    def run_between_steps(self, job: Job, tokens: int) -> None:
        """Queues `job` for the engine thread, which runs one job between two steps, so running streams wait at
        most one job. It counts as one waiting request of `tokens` prompt tokens against the queue's bounds."""
        if not self.alive:
            raise EngineStopped("the engine loop is not running")
        with self._queue_lock:
            if self.num_waiting + 1 > self.max_waiting:
                raise QueueFull(f"{self.num_waiting} sequences are waiting (limit {self.max_waiting})")
            if self.queued_tokens + tokens > self.max_queued_tokens:
                raise QueueFull(f"{self.queued_tokens} prompt tokens are waiting (limit {self.max_queued_tokens})")
            self.queued_tokens += tokens
        self._jobs.put((job, tokens))
        self._wake.set()

    def cancel(self, state: RequestState) -> None:
        state.cancelled = True
        self._wake.set()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + self._incoming.qsize() + self._jobs.qsize()

    def kv_usage(self) -> float:
        return self.cache.usage(sum(s.length for s in list(self.running.values())))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._failed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the engine loop

    def _loop(self) -> None:
        log.info("engine loop started")
        try:
            self._serve()
        except BaseException as exc:  # the loop itself broke: answer everyone, then report unhealthy
            self._failed = True
            log.critical("engine loop died: %s", exc, exc_info=True)
            self._admit_incoming()
            for seq in [*self.running.values(), *self.waiting]:
                if seq.finish_reason is None:
                    self._finish(seq, "error", error="the engine stopped; retry on another replica")
            raise
        log.info("engine loop stopped")

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.running and not self.waiting and self._incoming.empty() and self._jobs.empty():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._run_job()
            try:
                self.step()
            except Exception as exc:  # one bad step fails the sequences in it; the loop keeps serving
                log.exception("engine step failed")
                reason = f"{type(exc).__name__}: {exc}"
                for seq in list(self.running.values()):
                    if seq.finish_reason is None:  # those that ended in this step already had their final event
                        self._finish(seq, "error", error=f"engine step failed: {reason}")
                self._retire(list(self.running.values()))

    def step(self) -> None:
        self._retire(self._cancelled())
        self._admit()
        prefilled = self._prefill()  # [(sequence, logits (V,))] whose prompt completed this step
        decoded = self._decode()  # [(sequence, logits (V,))] one new position each
        tokens = self._sample(prefilled + decoded)
        finished = self._emit(tokens)
        self._retire(finished)
        self.steps += 1

    def _run_job(self) -> None:
        try:
            job, tokens = self._jobs.get_nowait()
        except queue.Empty:
            return
        with self._queue_lock:
            self.queued_tokens -= tokens
        try:
            job()
        except Exception:  # a job answers its own caller; a bug in one must not stop the loop
            log.exception("a job between engine steps failed")

    def _cancelled(self) -> list[Sequence]:
        self._admit_incoming()
        for seq in [s for s in self.waiting if s.state.cancelled]:
            self.waiting.remove(seq)
            self._dequeued(seq)
            self._finish(seq, "cancelled")
        return [s for s in self.running.values() if s.state.cancelled]

    def _admit_incoming(self) -> None:
        while True:
            try:
                self.waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                break

    def _dequeued(self, seq: Sequence) -> None:
        with self._queue_lock:
            self.queued_tokens -= len(seq.prompt)

    def _admit(self) -> None:
        self._admit_incoming()
        while self.waiting and self.cache.num_free:
            seq = self.waiting.popleft()
            if seq.state.cancelled:
                self._dequeued(seq)
                self._finish(seq, "cancelled")
                continue
            slot = self.cache.allocate()
            if slot is None:  # cannot happen while num_free > 0; keep the sequence rather than lose it
                self.waiting.appendleft(seq)
                break
            self._dequeued(seq)
            seq.slot, seq.admitted = slot, time.perf_counter()
            self.running[slot] = seq

    def _prefill(self) -> list[tuple[Sequence, np.ndarray]]:
        budget, done = self.prefill_chunk, []
        for seq in sorted(
            (s for s in self.running.values() if s.prefilled < len(s.prompt)), key=lambda s: s.admitted or 0.0
        ):
            if budget <= 0:
                break
            start = seq.prefilled
            chunk = seq.prompt[start : start + budget]  # (S,)
            S = len(chunk)
            wanted = np.arange(S) if seq.state.request.prompt_logprobs else np.array([S - 1])  # logits only where read
            logits = self.engine.forward(
                chunk[None],
                np.arange(start, start + S)[None],
                np.array([start + S - 1], np.int32),
                seq.slot,
                seq.slot + 1,
                wanted,
            )  # (S or 1, V)
            if seq.state.request.prompt_logprobs:
                self._collect_prompt_logprobs(seq, logits, start)
            seq.prefilled += S
            self.cache.lengths[seq.slot] = seq.prefilled
            budget -= S
            if seq.prefilled == len(seq.prompt):
                done.append((seq, logits[-1]))
        return done

    def _decode(self) -> list[tuple[Sequence, np.ndarray]]:
        rows = sorted(s.slot for s in self.running.values() if s.decoding)
        if not rows:
            return []
        lo, hi = rows[0], rows[-1] + 1
        lengths = self.cache.lengths[lo:hi].copy()  # (B,) positions already written per row
        input_ids = np.zeros((hi - lo, 1), np.int64)  # (B, 1); rows not decoding get a dummy token
        for slot in rows:
            input_ids[slot - lo, 0] = self.running[slot].output[-1]
        wanted = np.array(rows) - lo  # rows riding along get no logits
        logits = self.engine.forward(input_ids, lengths[:, None], lengths.astype(np.int32), lo, hi, wanted)  # (R, V)
        for slot in rows:
            self.cache.lengths[slot] += 1
        return [(self.running[slot], logits[i]) for i, slot in enumerate(rows)]

    def _sample(self, batch: list[tuple[Sequence, np.ndarray]]) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        out = []
        for seq, logits in batch:
            if not np.isfinite(logits).all():
                self._finish(seq, "error", error="the model produced non-finite logits")
                continue
            p = seq.params
            allowed = seq.constraint.allowed(logits.size) if seq.constraint is not None else None
            if allowed is not None and not allowed.any():
                self._finish(seq, "error", error="the response format's grammar allows no further token")
                continue
            banned = seq.stop.banned(len(seq.output))
            token = sample(logits, p, seq.rng, seq.counts, seq.prompt, banned, allowed)
            lp = self._logprob(logits, token, p.logprobs) if p.logprobs is not None else None
            out.append((seq, token, lp))
        return out

    def _emit(self, tokens: list[tuple[Sequence, int, TokenLogprob | None]]) -> list[Sequence]:
        """Each sequence takes its token and says whether it ended (its stop criteria); its event goes out."""
        finished = [s for s in self.running.values() if s.finish_reason]  # failed while sampling
        for seq, token, lp in tokens:
            self._send(seq, seq.append(token, lp))
            if seq.finish_reason:
                finished.append(seq)
        return finished

    def _retire(self, sequences: list[Sequence]) -> None:
        """Frees each sequence's slot (and so its cache positions); one cancelled by its client is told after."""
        for seq in sequences:
            if self.running.get(seq.slot) is seq:
                del self.running[seq.slot]
                self.cache.free(seq.slot)
            if seq.finish_reason is None:  # cancelled by its client: the slot is free when this event goes out
                self._finish(seq, "cancelled")

    # ------------------------------------------------------------------ helpers

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self._send(seq, seq.end(reason, error))

    def _send(self, seq: Sequence, event: TokenEvent) -> None:
        try:
            seq.state.sink(event)
        except Exception:  # a sink must never take the engine loop down
            log.exception("request %s: delivering an event failed", seq.state.request.request_id)
            seq.state.cancelled = True

    def _logprob(self, logits: np.ndarray, token: int, k: int) -> TokenLogprob:
        lps = log_softmax(logits)
        top = tuple((i, self.tokenizer.token_text(i), lp) for i, lp in top_logprobs(lps, k))
        return TokenLogprob(token, self.tokenizer.token_text(token), float(lps[token]), top)

    def _collect_prompt_logprobs(self, seq: Sequence, logits: np.ndarray, start: int) -> None:
        if start == 0:
            seq.prompt_logprobs.append(None)  # the first prompt token has no context
        k = seq.params.logprobs or 0
        for i in range(len(logits)):
            pos = start + i + 1
            if pos < len(seq.prompt):
                seq.prompt_logprobs.append(self._logprob(logits[i], int(seq.prompt[pos]), k))

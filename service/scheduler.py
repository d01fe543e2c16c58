"""Continuous (iteration-level) batching over the engine, on one thread of its own.

Design note. Every engine step reads top to bottom:

    retire cancelled -> admit -> plan -> place -> for each graph call: (decode | prefill) -> sample -> emit
    -> retire finished

Admission. Waiting sequences are admitted FIFO whenever a cache slot is free, without waiting for the batch to
drain. Each sequence owns one slot from admission to retirement. On admission the prefix cache
(service/prefix_cache.py) finds the longest prefix of the prompt whose keys and values some slot already holds (a
finished sequence's slot kept as an entry, or a running sequence's written positions): an entry's slot is taken
over as it is; from a running slot the prefix is borrowed where the graph reads shared prefixes (the engine's
`shares_prefixes`: the new slot reads those positions from the other's row, and a decode step reads them once for
every row sharing them), else copied into the new one. Either way those positions are not computed again.

A token budget per step (`max_num_batched_tokens`, vLLM's name). Every decoding sequence gets its one token first;
prompt chunks fill what is left. Continuing prompts (already partly in the cache: a chat's next turn after its cached
system prompt) get one graph call a step, the oldest first: as many as share a call of up to CONTINUE_CALL_TOKENS padded
tokens where the graph runs the project's CausalAttention, which takes several new tokens on rows with a past and any
cache rows; onnxruntime's GroupQueryAttention takes several new tokens per row only for rows whose past is empty, so
there one. A burst of chat turns (users whose previous answers ended in the same step) is so spread over steps with
decode calls between them: each turn's stream starts decoding right after its call, the streams running wait at most one
such call between two tokens, and the users' next turns no longer arrive together (W4 served, TTFT p50 1,080-1,337 ->
234-244 ms; docs/BENCHMARKS.md). Fresh prompts start together, right-padded to a common chunk length S chosen to fill
the budget with the most real tokens, in calls of at most PREFILL_CALL_TOKENS (PREFILL_CALL_TOKENS_CPU on the CPU), all
in the step that plans them (a burst of fresh prompts measured best prefilled at once: the token budget's curve in
docs/BENCHMARKS.md). A padded row writes throwaway keys past its own length, which its next real write overwrites. On
the CPU a prompt gets at most PREFILL_CHUNK_CPU tokens a step, and of the prompts with more than that left only one
computes at a time (vLLM's max_long_partial_prefills of 1): the others wait for it, so a burst of long prompts is
prefilled one after another, not all in lockstep, and those sharing its prefix (a chat service's system prompt) copy
that from its slot when their turn comes instead of computing it too. The decode call runs first, then the prompt calls;
each call's tokens are sampled and sent before the next call starts, so a prompt's first token never waits for the
prefill of the prompts after it. (The prompt calls first measured worse: a chat's next turn, sent right after a decode
call brought its previous answer's last token, then just misses the next step's start; docs/BENCHMARKS.md.) Prompts that
arrive while a step's calls run join that step, within what is left of its budget: a burst the engine began before all
of it had arrived stalls the running streams once, not once per part.

No idle rows. A graph on the project's CausalAttention reads each batch row's cache row wherever it is: nothing moves.
Otherwise a graph call binds one contiguous range of cache rows, so before the calls the scheduler places
the decoding sequences in slots [0, D) and the fresh prompts right after them, swapping slot contents (only the
valid positions on the CPU; device to device on CUDA) with whatever holds the slot it needs: another sequence, a
prefix-cache entry, or nothing. In a steady batch nothing moves; when a stream in the middle ends, the last one
moves into its place once. On the CPU, decoding sequences that already hold a contiguous range, and fresh prompts
that hold another apart from it, are computed where they are (a lone stream is never moved, so a new request does
not first copy the cached entry of the one before it out of slot 0).

Sampling runs over all rows of a call at once (service/sampler.py); on CUDA a decode call with REDUCE_SAMPLED_ROWS
sampled rows or more asks the engine for its logits reduced on the device (sampler.Candidates), not copied whole.
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
from functools import partial

import numpy as np

from service.engine import Engine
from service.grammar import Grammars
from service.kv_cache import CacheRows
from service.prefix_cache import PrefixCache, common_prefix
from service.sampler import Candidates, Row, logprobs_batch, reduction_inputs, sample_batch
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
# Fresh prompts are prefilled together in calls of at most this many (padded) tokens, each call's first tokens sent
# before the next call: 4 rows of 128 tokens prefill as fast per token as 16 in one call (docs/BENCHMARKS.md), and
# the first of a burst of prompts no longer waits for the last one's prefill. On the CPU a call of 1 or 2 such rows
# costs no more per token than one of 4, so calls there are smaller and the median prompt of a burst starts sooner
# (16 x 128 tokens: the median prompt's first token 7-9% sooner in the engine, 14% served; docs/BENCHMARKS.md);
# elsewhere not measured.
PREFILL_CALL_TOKENS = 512
PREFILL_CALL_TOKENS_CPU = 256
# On the CPU a prompt is prefilled in chunks of at most this many tokens, one a step: onnxruntime's CPU
# GroupQueryAttention computes every chunk's whole square of scores against the positions before it, the masked half
# too, so a long prompt costs less in chunks (1,024 tokens: 22-24% less time in chunks of 256 than in one call, fp32 and
# int4; docs/BENCHMARKS.md; not measured again with the project's CausalAttention, which computes the causal half).
# Elsewhere a prompt's chunk is bounded by the step's token budget alone (not measured).
PREFILL_CHUNK_CPU = 256
# Where the engine addresses the cache (the project's CausalAttention), the step's call of continuing prompts (new
# tokens after a cached prefix: chat turns) holds at most this many padded tokens. A call streams every weight once
# however many rows it has (32 tokens after 1,000 cached, fp32: four rows in one call 2.5x one row's time, int4 2.1x;
# `loadtests.paired --rows`), but with one such call a step, a small one spreads a burst of turns the most: W4's
# time to first token, p50, in-process and alternating (`loadtests.shared_prefix --continue-call-tokens`): 32 (one
# 32-token turn a call) 156-167 ms, 64 240-246, 128 378-400, 256 557-617; served, 32 / 64 / 128: 234-244 / 381-484
# / 682-711 ms, with the most tokens/s and the lowest ITL p99 at 32 (docs/BENCHMARKS.md). Longer chunks run alone.
CONTINUE_CALL_TOKENS = 32


# Decode steps with at least this many sampled rows have their logits reduced where the engine can (on CUDA: the
# reducer's call and its bookkeeping cost ~0.5 ms, the host sampler ~0.3 ms a sampled row; greedy rows take the
# argmax of the copied logits either way, and alone are faster without it; docs/BENCHMARKS.md).
REDUCE_SAMPLED_ROWS = 4


Ready = tuple[list[Sequence], np.ndarray | Candidates]  # sequences that take a token now, their logits (N, V)
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
        max_num_batched_tokens: int,
        max_waiting: int = 1024,
        max_queued_tokens: int = 1 << 30,
        grammars: Grammars | None = None,
        prefix_cache: bool = True,
        prefill_chunk: int | None = None,  # a prompt's tokens per step at most (None: PREFILL_CHUNK_CPU on the CPU)
    ) -> None:
        self.engine, self.tokenizer, self.eos_ids = engine, tokenizer, frozenset(eos_token_ids)
        self.grammars = grammars
        self.max_model_len, self.budget, self.max_waiting = max_model_len, max_num_batched_tokens, max_waiting
        if prefill_chunk is None:
            prefill_chunk = PREFILL_CHUNK_CPU if engine.device == "cpu" else max_model_len
        self.prefill_chunk = prefill_chunk
        self.prefill_call = PREFILL_CALL_TOKENS_CPU if engine.device == "cpu" else PREFILL_CALL_TOKENS
        self.max_queued_tokens = max_queued_tokens
        self.queued_tokens = 0  # prompt tokens of sequences not yet admitted
        self._queue_lock = threading.Lock()
        self._failed = False
        self.cache = engine.cache
        self.prefix = PrefixCache(self.cache.slots, prefix_cache)
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
        return self.waiting_room <= 0 or self.queued_tokens >= self.max_queued_tokens

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestState:
        """Queues a validated request (service.validation made its limits hold) as n sequences."""
        assert len(request.prompt_ids) + request.params.max_tokens <= self.max_model_len, "validation let it through"
        if not self.alive:
            raise EngineStopped("the engine loop is not running")
        tokens = len(request.prompt_ids) * request.n
        with self._queue_lock:
            if request.n > self.waiting_room:
                raise QueueFull(f"{self.num_waiting} sequences are waiting (limit {self.max_waiting})")
            if self.queued_tokens + tokens > self.max_queued_tokens:
                raise QueueFull(f"{self.queued_tokens} prompt tokens are waiting (limit {self.max_queued_tokens})")
            self.queued_tokens += tokens
        state = RequestState(request, sink)
        prompt = np.asarray(request.prompt_ids, dtype=np.int64)
        p = request.params
        stop = StopCriteria(self.eos_ids, p.max_tokens, self.cache.max_len, p.min_tokens, p.ignore_eos)
        for i in range(request.n):
            rng = np.random.default_rng(None if p.seed is None else [p.seed % 2**64, i])  # a negative seed too
            detok = IncrementalDetokenizer(self.tokenizer, list(p.stop), list(prompt[-PROMPT_TAIL:]))
            constraint = self.grammars.matcher(p.grammar) if p.grammar is not None and self.grammars else None
            self._incoming.put(Sequence(state, i, prompt, rng, detok, stop, constraint))
        self._wake.set()
        if self._failed:  # the loop died after the check above, and took its last look at the queue before these
            self._answer_orphans()
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
    def waiting_room(self) -> int:
        """Sequences that may still queue: max_waiting, plus the free slots the next step admits into (sequences
        bound for them are not left waiting), less those queued."""
        return self.max_waiting + self.cache.slots - len(self.running) - self.num_waiting

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
            except Exception as exc:  # a step that broke outside its calls fails its sequences; the loop keeps serving
                log.exception("engine step failed")
                reason = f"{type(exc).__name__}: {exc}"
                for seq in list(self.running.values()):
                    if seq.finish_reason is None:  # those that ended in this step already had their final event
                        self._finish(seq, "error", error=f"engine step failed: {reason}")
                self._retire(list(self.running.values()))

    def step(self) -> None:
        self._retire(self._cancelled())
        self._admit()
        decoding = [s for s in self.running.values() if s.decoding]
        budget = self.budget - len(decoding)
        continuing, fresh = self._plan_prefill(budget, continue_call=True)
        if not self._in_place(decoding, [seq for seq, _ in fresh]):
            self._place(decoding, 0)
            self._place([seq for seq, _ in fresh], len(decoding))
        # One graph call at a time, its tokens sampled and sent before the next call runs: a stream's token never
        # waits for another sequence's call. (sequences, logits (N, V)) -> [(sequence, token, logprob)] -> events
        self._call(decoding, partial(self._decode, decoding))
        budget -= self._prefill(continuing, fresh)
        self._join_late(budget, continue_call=not continuing)
        self._retire([s for s in self.running.values() if s.finish_reason])
        self.steps += 1

    def _prefill(self, continuing: list[tuple[Sequence, int]], fresh: list[tuple[Sequence, int]]) -> int:
        """The planned prompt chunks, each call's first tokens sent before the next call: the continuing prompts' one
        call, then the fresh prompts' calls; -> the budget they used (a fresh prompt's row costs its call's padded
        length)."""
        if continuing:
            self._call([seq for seq, _ in continuing], partial(self._prefill_rows, continuing))
        for group in _prefill_calls(fresh, self.prefill_call):
            self._call([seq for seq, _ in group], partial(self._prefill_rows, group))
        return sum(c for _, c in continuing) + len(fresh) * max((c for _, c in fresh), default=0)

    def _join_late(self, budget: int, continue_call: bool) -> None:
        """Prompts that arrived while this step's calls ran are prefilled in it too, within what is left of its
        token budget, as they would have been had they come before it began: the streams already running are
        waiting out this step's prompt calls anyway, and would otherwise wait out a second step of them (a burst
        the engine began before all of it had arrived; docs/BENCHMARKS.md, W2 read back). A prompt longer than a
        chunk is left for the next step, where one long prompt computes at a time."""
        while budget > 0 and not self._incoming.empty():
            taken = set(self.running)  # slots; admitting moves no one
            self._admit()
            late = [
                seq
                for slot, seq in self.running.items()
                if slot not in taken and len(seq.prompt) - seq.prefilled <= min(budget, self.prefill_chunk)
            ]
            continuing, fresh = self._plan_prefill(budget, continue_call, among=late)
            if not continuing and not fresh:
                return
            group = [seq for seq, _ in fresh]
            if group and not self._in_place([], group):
                self._place(group, len(self.running) - len(group))
            budget -= self._prefill(continuing, fresh)
            continue_call = continue_call and not continuing

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

    def _answer_orphans(self) -> None:
        """After the loop died: every sequence still queued gets its final event."""
        while True:
            try:
                seq = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._finish(seq, "error", error="the engine stopped; retry on another replica")

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
        while self.waiting and len(self.running) < self.cache.slots:
            seq = self.waiting.popleft()
            self._dequeued(seq)
            if seq.state.cancelled:
                self._finish(seq, "cancelled")
                continue
            try:
                slot, n = self._slot_for(seq)
            except Exception as exc:  # in neither queue now: answered here, then the step fails as it would
                self._finish(seq, "error", error=f"engine step failed: {type(exc).__name__}: {exc}")
                raise
            self.cache.lengths[slot] = n
            seq.slot, seq.prefilled, seq.cached, seq.admitted = slot, n, n, time.perf_counter()
            self.running[slot] = seq

    def _slot_for(self, seq: Sequence) -> tuple[int, int]:
        """A free slot for an admitted sequence, holding its prompt's longest cached prefix where one is found:
        (slot, the prefix's length)."""
        free = [slot for slot in range(self.cache.slots) if slot not in self.running]
        source, n = None, 0
        if not seq.state.request.prompt_logprobs:  # those need the logits of every prompt position
            source, n = self.prefix.lookup(seq.prompt, self._written())
        if source in free and self.prefix.can_take_over(source, n):
            slot = source
        else:
            slot = self.prefix.victim(free, spare=source)
        if slot == source:  # an entry taken over as it is (one that lent more than this prompt keeps: no longer)
            self._give_back(slot, unless_within=n)
            self.prefix.take_over(slot, n)
        else:
            self._give_back(slot)
            self.prefix.drop(slot)
            if source is not None:
                self._reuse(source, slot, n)
        return slot, n

    def _plan_prefill(
        self, budget: int, continue_call: bool, among: list[Sequence] | None = None
    ) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, int]]]:
        """Which prompts get how many tokens this step, within `budget` tokens: (continuing, fresh), each a list
        of (sequence, chunk length). Continuing prompts go first, oldest first, as many as share one graph call
        (_joins), where `continue_call` (the step has not run one yet); then fresh prompts, right-padded to the chunk
        length that fits the most real tokens (every row of it costs S tokens), split into calls later. `among`:
        only these sequences (late arrivals) are planned.

        No chunk is longer than `prefill_chunk`, and of the prompts with more than that left only one computes at a
        time (the leader: the one part-way through, else the oldest); the others wait, and look for their prefix
        again when their turn comes, so prompts sharing a long prefix with the leader copy it rather than compute
        it beside it. The next one starts beside the leader's last chunk unless it shares more with the leader's
        prompt than the leader has written (it then waits a step more and copies all of that)."""
        candidates = self.running.values() if among is None else among
        pending = sorted((s for s in candidates if s.prefilled < len(s.prompt)), key=lambda s: s.admitted or 0)
        if budget <= 0 or not pending:
            return [], []
        cap = self.prefill_chunk

        def left(s: Sequence) -> int:
            return len(s.prompt) - s.prefilled

        # prompts with more than `cap` to compute that have begun: the one with more than a chunk left leads
        started = [s for s in pending if s.prefilled > s.cached and len(s.prompt) - s.cached > cap]
        leader = next((s for s in started if left(s) > cap), None)
        ending = [s for s in started if left(s) <= cap]  # their last chunk is this step's

        def waits(s: Sequence) -> bool:
            """A prompt with more than `cap` left that may neither start nor look for its prefix this step."""
            if s in started or left(s) <= cap:
                return False
            if leader is not None:  # one long prompt computes at a time
                return True
            # start beside an ending one, unless it is writing a prefix this one would copy
            return self.prefix.enabled and any(common_prefix(s.prompt, e.prompt) > e.prefilled for e in ending)

        written = self._written()
        for seq in pending:  # a second look: others may have written more of its prefix since its admission
            if seq.prefilled > seq.cached or seq.state.request.prompt_logprobs or waits(seq):
                continue  # computing its own already, or needing every position's logits, or not its turn
            if self.prefix.borrowers(seq.slot):
                continue  # others read its positions: they stay as they are
            # its own slot holds `prefilled` tokens of it, never more than `beyond`: no need to leave it out
            source, n = self.prefix.lookup(seq.prompt, written, again=True, beyond=seq.prefilled)
            if source is not None:
                self.prefix.release(seq.slot)
                self._reuse(source, seq.slot, n)
                seq.prefilled = seq.cached = n
        if leader is None:
            leader = next((s for s in pending if left(s) > cap and not waits(s)), None)
        ready = [s for s in pending if left(s) <= cap or s is leader]
        continuing: list[tuple[Sequence, int]] = []  # one call's rows, oldest first
        for seq in ready if continue_call else ():
            if seq.prefilled and budget > 0:
                chunk = _not_one_short(left(seq), min(left(seq), budget, cap))
                if continuing and not self._joins(continuing, seq, chunk):
                    break
                continuing.append((seq, chunk))
                budget -= chunk
        fresh = [s for s in ready if not s.prefilled]
        if budget <= 0 or not fresh:
            return continuing, []
        best: tuple[int, int] = (0, 0)  # (real tokens, -S)
        for S in sorted({min(len(s.prompt), budget, cap) for s in fresh}):
            rows = fresh[: budget // S]
            best = max(best, (sum(min(len(s.prompt), S) for s in rows), -S))
        S = -best[1]
        return continuing, [(s, _not_one_short(len(s.prompt), min(len(s.prompt), S))) for s in fresh[: budget // S]]

    def _in_place(self, decoding: list[Sequence], fresh: list[Sequence]) -> bool:
        """Whether nothing need move: the graph addresses the cache rows (any slots), or on the CPU the decoding
        sequences hold a contiguous range of slots, and the fresh prompts another (apart
        from it, as no two sequences share a slot; a lone stream, a steady batch): their calls bind those ranges where
        they are, and nothing moves. (On CUDA the decode call stays at [0, D), where its graphs are captured.)"""
        if self.engine.shares_prefixes:  # the graph reads each row's cache row wherever it is
            return True
        if self.engine.device != "cpu":
            return False
        groups = [sorted(s.slot for s in group) for group in (decoding, fresh)]
        return all(not slots or slots == list(range(slots[0], slots[0] + len(slots))) for slots in groups)

    def _place(self, group: list[Sequence], lo: int) -> None:
        """Moves the sequences of `group` into slots [lo, lo + len(group)), swapping with whatever is there."""
        hi = lo + len(group)
        members = {s.slot for s in group}
        holes = [slot for slot in range(lo, hi) if slot not in members]
        for seq, hole in zip([s for s in group if not lo <= s.slot < hi], holes):
            self._swap(seq.slot, hole)

    def _swap(self, a: int, b: int) -> None:
        self.cache.swap(a, b)
        self.prefix.swap(a, b)
        sa, sb = self.running.pop(a, None), self.running.pop(b, None)
        if sa is not None:
            sa.slot, self.running[b] = b, sa
        if sb is not None:
            sb.slot, self.running[a] = a, sb

    def _reuse(self, source: int, slot: int, n: int) -> None:
        """`slot` takes the first n positions that slot `source` holds: borrowed where the graph reads a shared
        prefix (what source itself borrows, or source's own positions), else copied; `slot` borrows nothing yet."""
        shared = self.prefix.borrow(slot, source, n) if self.engine.shares_prefixes else 0
        self.cache.copy(source, slot, n, start=shared)  # only what is not borrowed

    def _give_back(self, lender: int, unless_within: int = 0) -> None:
        """The slots borrowing positions from `lender` get their own copies of them (it is about to be given up or
        rewritten); those borrowing no more than `unless_within` positions keep reading them there."""
        for slot, n in self.prefix.borrowers(lender):
            if n > unless_within:
                self.cache.copy_positions(lender, slot, n)
                self.prefix.release(slot)

    def _rows(self, slots: list[int]) -> CacheRows | None:
        """The engine's cache rows for a call over `slots` (with the prefixes they borrow), where it addresses them."""
        return self.prefix.rows(slots) if self.engine.shares_prefixes else None

    def _joins(self, call: list[tuple[Sequence, int]], seq: Sequence, S: int) -> bool:
        """Whether a continuing prompt's chunk of S tokens joins a call of others: where the engine addresses the
        cache (rows anywhere, each with its own past), while the call stays within CONTINUE_CALL_TOKENS padded tokens
        and every row's padding within the cache; elsewhere a continuing prompt runs alone."""
        if not self.engine.shares_prefixes:
            return False
        width = max(S, *(c for _, c in call))
        fits = all(q.prefilled + width <= self.cache.max_len for q, _ in [*call, (seq, S)])  # padding too
        return fits and width * (len(call) + 1) <= CONTINUE_CALL_TOKENS

    def _prefill_rows(self, chunks: list[tuple[Sequence, int]]) -> Ready:
        """Prompt chunks in one graph call: each row's chunk of new tokens after its `prefilled` ones, right-padded to
        the longest (S). Either every row is a fresh prompt (empty past: the graph places them at 0..S-1) or every row
        continues one. Rows are the sequences' slots: anywhere where the engine addresses the cache, else contiguous
        (fresh prompts placed so; a continuing prompt alone). A padded row writes throwaway keys past its own length,
        which its next real write overwrites."""
        B, S, lo = len(chunks), max(c for _, c in chunks), chunks[0][0].slot
        slots = [seq.slot for seq, _ in chunks]
        assert self.engine.shares_prefixes or slots == list(range(lo, lo + B)), "placed contiguously"
        input_ids = np.zeros((B, S), np.int64)  # (B, S) right-padded
        positions = np.zeros((B, S), np.int64)  # (B, S)
        wanted = []
        for r, (seq, c) in enumerate(chunks):
            start = seq.prefilled
            input_ids[r, :c] = seq.prompt[start : start + c]
            positions[r] = np.arange(start, start + S)
            wanted.append(r * S + (np.arange(c) if seq.state.request.prompt_logprobs else np.array([c - 1])))
        logits = self.engine.forward(
            input_ids,
            positions,
            positions[:, -1].astype(np.int32),  # (B,) each row's length after the call - 1
            lo,
            lo + B,
            np.concatenate(wanted),
            None,
            self._rows(slots),
        )  # (sum of wanted, V): logits only where read
        done, last, at = [], [], 0
        for (seq, c), w in zip(chunks, wanted):
            at += len(w)
            if self._prefilled(seq, c, logits[at - len(w) : at]):
                done.append(seq)
                last.append(at - 1)
        return done, logits[last]

    def _prefilled(self, seq: Sequence, S: int, logits: np.ndarray) -> bool:
        """Books S more prompt tokens of seq as written; whether its prompt is complete (its last logits then give
        its first token)."""
        if seq.state.request.prompt_logprobs:
            self._collect_prompt_logprobs(seq, logits, seq.prefilled)
        seq.prefilled += S
        self.cache.lengths[seq.slot] = seq.prefilled
        return seq.prefilled == len(seq.prompt)

    def _decode(self, decoding: list[Sequence]) -> Ready:
        """One new token for each decoding sequence, all in one graph call over their slots [lo, lo + D)."""
        if not decoding:
            return [], np.zeros((0, 0), np.float32)
        seqs = sorted(decoding, key=lambda s: s.slot)
        D, lo = len(seqs), seqs[0].slot
        slots = [s.slot for s in seqs]
        assert self.engine.shares_prefixes or slots == list(range(lo, lo + D)), "placed in [lo, lo + D)"
        lengths = self.cache.lengths[slots].copy()  # (D,) positions already written per row
        input_ids = np.array([[s.output[-1]] for s in seqs], np.int64)  # (D, 1)
        reduce = None
        if self.engine.reducer is not None and sum(not s.params.greedy for s in seqs) >= REDUCE_SAMPLED_ROWS:
            reduce = reduction_inputs([self._row(s, grammar=False) for s in seqs])  # the sampler gets Candidates
        logits = self.engine.forward(
            input_ids,
            lengths[:, None],
            lengths.astype(np.int32),
            lo,
            lo + D,
            np.arange(D),
            reduce,
            self._rows(slots),
        )  # (D, V) or their Candidates
        self.cache.lengths[slots] += 1
        return seqs, logits

    def _sample(self, ready: Ready) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """(sequences, their logits (N, V)) -> (sequence, token, logprob) for each that can take a token."""
        seqs, logits = ready
        if not seqs:
            return []
        finite = np.asarray(logits.finite if isinstance(logits, Candidates) else np.isfinite(logits).all(axis=1))
        rows, keep = [], []
        for i, seq in enumerate(seqs):
            if not finite[i]:
                self._finish(seq, "error", error="the model produced non-finite logits")
                continue
            try:
                row = self._row(seq)  # its grammar's mask
            except Exception as exc:  # one sequence's grammar failing fails it alone
                log.exception("request %s: its sampling row failed", seq.state.request.request_id)
                self._finish(seq, "error", error=f"engine step failed: {type(exc).__name__}: {exc}")
                continue
            if row.allowed is not None and not row.allowed.any():
                self._finish(seq, "error", error="the response format's grammar allows no further token")
                continue
            rows.append(row)
            keep.append(i)
        if not keep:
            return []
        if len(keep) < len(seqs):
            logits = logits[keep]
        tokens = sample_batch(logits, rows)  # (N,)
        lps: list[TokenLogprob | None] = [None] * len(keep)
        want = [j for j, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            k = max(rows[j].params.logprobs or 0 for j in want)
            chosen, top_ids, top_lps = logprobs_batch(logits[want], tokens[want], k)
            text = self.tokenizer.token_text
            for m, j in enumerate(want):
                kj = rows[j].params.logprobs or 0
                top = tuple((int(t), text(int(t)), float(v)) for t, v in zip(top_ids[m, :kj], top_lps[m, :kj]))
                lps[j] = TokenLogprob(int(tokens[j]), text(int(tokens[j])), float(chosen[m]), top)
        return [(seqs[i], int(tokens[j]), lps[j]) for j, i in enumerate(keep)]

    def _row(self, seq: Sequence, grammar: bool = True) -> Row:
        """What the sampler needs of a sequence for its next token (without its grammar's mask: what the engine
        needs to reduce its logits)."""
        allowed = None
        if grammar and seq.constraint is not None:
            allowed = seq.constraint.allowed(self.engine.bundle.vocab_size)  # (V,) bool
        return Row(seq.params, seq.rng, seq.counts, seq.prompt, seq.stop.banned(len(seq.output)), allowed)

    def _call(self, seqs: list[Sequence], run: Callable[[], Ready]) -> None:
        """One graph call, its tokens sampled and sent. A call that raises fails the sequences in it, and the step
        goes on: the other calls' sequences keep their tokens and their streams."""
        try:
            self._emit(self._sample(run()))
        except Exception as exc:
            log.exception("an engine call failed")
            for seq in seqs:
                if seq.finish_reason is None:  # those that ended in it already had their final event
                    self._finish(seq, "error", error=f"engine call failed: {type(exc).__name__}: {exc}")

    def _emit(self, tokens: list[tuple[Sequence, int, TokenLogprob | None]]) -> None:
        """Each sequence takes its token and learns whether it ended (its stop criteria); its event goes out. One
        whose token cannot be taken (its grammar, its detokenizer raising) fails alone."""
        for seq, token, lp in tokens:
            try:
                event = seq.append(token, lp)
            except Exception as exc:
                log.exception("request %s: taking a token failed", seq.state.request.request_id)
                self._finish(seq, "error", error=f"engine step failed: {type(exc).__name__}: {exc}")
                continue
            self._send(seq, event)

    def _retire(self, sequences: list[Sequence]) -> None:
        """Frees each sequence's slot; its written positions stay as a prefix-cache entry unless it failed. One
        cancelled by its client is told after."""
        for seq in sequences:
            if self.running.get(seq.slot) is seq:
                del self.running[seq.slot]
                if seq.finish_reason == "error":
                    self._give_back(seq.slot)
                    self.prefix.release(seq.slot)
                    self.cache.lengths[seq.slot] = 0
                else:
                    self.cache.lengths[seq.slot] = seq.length
                    self.prefix.keep(seq.slot, seq.written())
            if seq.finish_reason is None:  # cancelled by its client: the slot is free when this event goes out
                self._finish(seq, "cancelled")

    # ------------------------------------------------------------------ helpers

    def _written(self) -> dict[int, np.ndarray]:
        """slot -> the token ids its sequence has written (W,), for prefix lookups; a sequence that failed in this step
        (still running until the step retires it) lends nothing, as its retirement keeps no entry."""
        return {slot: s.written() for slot, s in self.running.items() if s.finish_reason != "error"}

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self._send(seq, seq.end(reason, error))

    def _send(self, seq: Sequence, event: TokenEvent) -> None:
        try:
            seq.state.sink(event)
        except Exception:  # a sink must never take the engine loop down
            log.exception("request %s: delivering an event failed", seq.state.request.request_id)
            seq.state.cancelled = True

    def _collect_prompt_logprobs(self, seq: Sequence, logits: np.ndarray, start: int) -> None:
        if start == 0:
            seq.prompt_logprobs.append(None)  # the first prompt token has no context
        k = seq.params.logprobs or 0
        n = min(len(logits), len(seq.prompt) - start - 1)  # the last position predicts the first output token
        if n <= 0:
            return
        targets = seq.prompt[start + 1 : start + 1 + n]
        chosen, top_ids, top_lps = logprobs_batch(logits[:n], targets, k)
        text = self.tokenizer.token_text
        for i in range(n):
            top = tuple((int(t), text(int(t)), float(v)) for t, v in zip(top_ids[i], top_lps[i]))
            seq.prompt_logprobs.append(TokenLogprob(int(targets[i]), text(int(targets[i])), float(chosen[i]), top))


def _not_one_short(left: int, chunk: int) -> int:
    """A chunk of a prompt with `left` tokens to compute that does not leave exactly one for later: a last chunk of
    one token would come from a one-row product, whose logits round differently (see service/prefix_cache.py)."""
    return chunk - 1 if left - chunk == 1 and chunk > 1 else chunk


def _prefill_calls(fresh: list[tuple[Sequence, int]], call_tokens: int) -> list[list[tuple[Sequence, int]]]:
    """Splits the step's fresh prompts (placed in consecutive slots) into graph calls of at most `call_tokens`
    padded tokens (at least one row each), in slot order."""
    if not fresh:
        return []
    fresh = sorted(fresh, key=lambda c: c[0].slot)
    rows = max(1, call_tokens // max(c for _, c in fresh))
    return [fresh[i : i + rows] for i in range(0, len(fresh), rows)]

"""One generation: its request, cache slot, output, stop criteria (eos ids, stop strings, length) and detokenizer.

The scheduler decides when a sequence runs; the sequence decides when it ends: `Sequence.append(token)` takes one
sampled token and returns the event to send, with the finish reason when one of its stop criteria fired.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.sampler import SamplingParams
from service.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    prompt_logprobs: bool = False  # echo with logprobs: log-probabilities of the prompt tokens too


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (token id, text, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    """New output of one sequence (choice `index`): text safe to show, the tokens behind it, and maybe the end.

    Every sequence gets exactly one event with a `finish_reason`, and nothing after it.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    error: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # with the first event when asked for
    queued_s: float | None = None  # with the first event: time from submission to admission
    cached_tokens: int | None = None  # with the first event: prompt tokens taken from the prefix cache


Sink = Callable[[TokenEvent], None]


class Constraint(Protocol):
    """A grammar that decoding must follow (structured output): which tokens may come next, and whether it ended."""

    def allowed(self, vocab_size: int) -> np.ndarray:  # (V,) bool
        ...

    def advance(self, token: int) -> bool:  # True when the grammar is complete and accepts nothing more
        ...


@dataclass(eq=False)
class RequestState:
    """What the n sequences of one request share: the request, where events go, and the cancel flag."""

    request: GenerationRequest
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass(frozen=True)
class StopCriteria:
    eos_ids: frozenset[int]  # every id that ends a generation (the bundle's eos ids)
    max_tokens: int
    max_len: int  # cache positions of a slot: prompt + output never exceed it
    min_tokens: int = 0
    ignore_eos: bool = False

    def banned(self, generated: int) -> tuple[int, ...]:
        """Ids the sampler must not pick now: the eos ids while ignoring them or before min_tokens."""
        return tuple(sorted(self.eos_ids)) if self.ignore_eos or generated < self.min_tokens else ()


@dataclass(eq=False)
class Sequence:
    state: RequestState
    index: int
    prompt: np.ndarray  # (P,) int64
    rng: np.random.Generator
    detok: IncrementalDetokenizer
    stop: StopCriteria
    constraint: Constraint | None = None
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of those, the ones reused from the prefix cache (not computed for this sequence)
    output: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    admitted: float | None = None
    finish_reason: str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.state.request.params

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt) and bool(self.output)

    @property
    def length(self) -> int:
        """Positions in the cache after this sequence's last written token."""
        return self.prefilled + max(len(self.output) - 1, 0)

    def written(self) -> np.ndarray:
        """The token ids whose keys and values this sequence's slot holds: positions [0, length)."""
        out = np.asarray(self.output[: self.length - self.prefilled], dtype=np.int64)
        return np.concatenate([self.prompt[: self.prefilled], out])

    def append(self, token: int, logprob: TokenLogprob | None) -> TokenEvent:
        """Takes one sampled token; returns its event, which ends the sequence when a stop criterion fires."""
        self.output.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        reason = None
        if token in self.stop.eos_ids and not self.stop.ignore_eos:
            text, reason = self.detok.flush(), "stop"  # the eos token itself is not shown
        else:
            delta = self.detok.add(token)
            text = delta.text
            if delta.stopped:
                reason = "stop"
            elif self.constraint is not None and self.constraint.advance(token):
                reason = "stop"
            elif len(self.output) >= self.stop.max_tokens or self.prefilled + len(self.output) >= self.stop.max_len:
                reason = "length"
            if reason is not None and not delta.stopped:
                text += self.detok.flush()
        first = len(self.output) == 1
        self.finish_reason = reason
        return TokenEvent(
            index=self.index,
            text=text,
            token_ids=(token,),
            logprobs=(logprob,) if logprob else None,
            finish_reason=reason,
            prompt_logprobs=tuple(self.prompt_logprobs) if first and self.state.request.prompt_logprobs else None,
            queued_s=(self.admitted - self.state.submitted) if first and self.admitted else None,
            cached_tokens=self.cached if first else None,
        )

    def end(self, reason: str, error: str | None = None) -> TokenEvent:
        """Ends the sequence from outside its stop criteria (an engine error, a cancel)."""
        self.finish_reason = reason
        return TokenEvent(index=self.index, text="", token_ids=(), logprobs=None, finish_reason=reason, error=error)

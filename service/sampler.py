"""Sampling parameters and pure sampling: (logits, params, history, rng) -> token id, plus log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output (CTRL / vLLM style)
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # how many alternatives per token; None = no logprobs
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before sampling
    grammar: str | None = None  # structured output: a compiled llguidance grammar that decoding must follow

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - logits.max()
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, output_counts: dict[int, int], prompt_ids: np.ndarray
) -> np.ndarray:
    """logits (V,) -> penalized copy. Presence/frequency act on the output; repetition on prompt and output;
    logit_bias last, as OpenAI adds it."""
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.concatenate([prompt_ids, np.fromiter(output_counts, dtype=np.int64)]).astype(np.int64))
        vals = logits[seen]
        logits = logits.copy()
        logits[seen] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_counts and (params.presence_penalty or params.frequency_penalty):
        ids = np.fromiter(output_counts.keys(), dtype=np.int64)
        counts = np.fromiter(output_counts.values(), dtype=np.float32)
        logits = logits.copy()
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    if params.logit_bias:
        ids = np.array([i for i, _ in params.logit_bias], dtype=np.int64)
        logits = logits.copy()
        logits[ids] += np.array([b for _, b in params.logit_bias], dtype=logits.dtype)
    return logits


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    output_counts: dict[int, int],
    prompt_ids: np.ndarray,
    banned: tuple[int, ...] = (),
    allowed: np.ndarray | None = None,
) -> int:
    """One token from logits (V,). `banned` ids (EOS before min_tokens) get zero probability, and so does every id
    outside `allowed` (V,) bool, a grammar's mask, when given."""
    logits = apply_penalties(logits, params, output_counts, prompt_ids)
    if banned or allowed is not None:
        logits = logits.copy()
        if allowed is not None:
            logits[~allowed] = -np.inf
        if banned and (allowed is None or allowed.sum() > np.count_nonzero(allowed[list(banned)])):
            logits[list(banned)] = -np.inf  # unless a grammar allows nothing else
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    if params.top_k > 0 and params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs < params.min_p * probs.max(), 0.0, probs)
        probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p) + 1)]  # smallest set reaching top_p
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs, most likely first."""
    if k <= 0:
        return []
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]

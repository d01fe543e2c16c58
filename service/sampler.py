"""Sampling, over the whole batch at once: logits (N, V) and each row's parameters -> N token ids, plus logprobs.

Every row draws exactly one uniform number from its own generator per token, and each row's arithmetic is
elementwise or along its own row, so a seeded request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_P_CANDIDATES = 1024  # top-p sorts only this many most likely tokens, unless they hold less than top_p


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


@dataclass(frozen=True)
class Row:
    """One row of a batch: its parameters, random generator, history, and the tokens it may not take now."""

    params: SamplingParams
    rng: np.random.Generator
    output_counts: dict[int, int]
    prompt_ids: np.ndarray  # (P,) int64
    banned: tuple[int, ...] = ()  # eos ids before min_tokens / with ignore_eos
    allowed: np.ndarray | None = None  # (V,) bool, a grammar's mask


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) -> (..., V) float32, along the last axis."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of one row (V,), most likely first."""
    if k <= 0:
        return []
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


def _scatter(rows: list[int], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flat (row, id) index arrays for fancy indexing of the (N, V) logits."""
    r = np.concatenate([np.full(len(i), row, np.int64) for row, i in zip(rows, ids)])
    return r, np.concatenate(ids).astype(np.int64)


def apply_penalties(logits: np.ndarray, rows: list[Row]) -> np.ndarray:
    """logits (N, V) -> penalized (a copy where anything changes). Repetition acts on prompt and output,
    presence/frequency on the output, logit_bias last (as OpenAI adds it); then banned and grammar masks."""
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    pen = [
        i for i, r in enumerate(rows) if r.output_counts and (r.params.presence_penalty or r.params.frequency_penalty)
    ]
    bias = [i for i, r in enumerate(rows) if r.params.logit_bias]
    masked = [i for i, r in enumerate(rows) if r.banned or r.allowed is not None]
    if not (rep or pen or bias or masked):
        return logits
    logits = logits.copy()
    if rep:
        seen = [
            np.unique(np.concatenate([rows[i].prompt_ids, np.fromiter(rows[i].output_counts, np.int64)])) for i in rep
        ]
        r, ids = _scatter(rep, seen)
        penalty = np.concatenate(
            [np.full(len(s), rows[i].params.repetition_penalty, np.float32) for i, s in zip(rep, seen)]
        )
        vals = logits[r, ids]
        logits[r, ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    if pen:
        r, ids = _scatter(pen, [np.fromiter(rows[i].output_counts, np.int64) for i in pen])
        sub = np.concatenate(
            [
                rows[i].params.frequency_penalty * np.fromiter(rows[i].output_counts.values(), np.float32)
                + rows[i].params.presence_penalty
                for i in pen
            ]
        )
        logits[r, ids] -= sub
    if bias:
        r, ids = _scatter(bias, [np.array([t for t, _ in rows[i].params.logit_bias]) for i in bias])
        logits[r, ids] += np.concatenate(
            [np.array([b for _, b in rows[i].params.logit_bias], np.float32) for i in bias]
        )
    for i in masked:
        row = rows[i]
        if row.allowed is not None:
            logits[i, ~row.allowed] = -np.inf
        if row.banned and (row.allowed is None or row.allowed.sum() > np.count_nonzero(row.allowed[list(row.banned)])):
            logits[i, list(row.banned)] = -np.inf  # unless a grammar allows nothing else
    return logits


def sample_batch(logits: np.ndarray, rows: list[Row]) -> np.ndarray:
    """logits (N, V) float32 -> token ids (N,) int64."""
    N, V = logits.shape
    logits = apply_penalties(logits, rows)
    tokens = np.argmax(logits, axis=1)  # (N,) greedy rows are done
    s = np.array([i for i, r in enumerate(rows) if not r.params.greedy], np.int64)
    if not len(s):
        return tokens
    temp = np.array([rows[i].params.temperature for i in s], np.float32)
    z = logits[s] / temp[:, None]  # (Ns, V)
    top_k = np.array([rows[i].params.top_k if 0 < rows[i].params.top_k < V else 0 for i in s])
    if top_k.any():
        K = int(top_k.max())
        largest = -np.sort(-np.partition(z, V - K, axis=1)[:, V - K :], axis=1)  # (Ns, K) descending
        kth = np.where(top_k > 0, largest[np.arange(len(s)), np.maximum(top_k, 1) - 1], -np.inf)
        z = np.where(z < kth[:, None], -np.inf, z)
    probs = np.exp(z - z.max(axis=1, keepdims=True))  # (Ns, V) unnormalized; the most likely token has 1.0
    min_p = np.array([rows[i].params.min_p for i in s], np.float32)
    if min_p.any():
        probs = np.where(probs < min_p[:, None], 0.0, probs).astype(np.float32)  # min_p x the top probability
    u = np.array([rows[i].rng.random() for i in s])  # one draw per row, from the row's own generator
    top_p = np.array([rows[i].params.top_p for i in s])
    plain = np.nonzero(top_p >= 1.0)[0]
    if len(plain):
        cdf = np.cumsum(probs[plain], axis=1, dtype=np.float64)  # (Np, V)
        pick = np.array([np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cdf, u[plain])])
        tokens[s[plain]] = np.minimum(pick, V - 1)
    nucleus = np.nonzero(top_p < 1.0)[0]
    if len(nucleus):
        k_n = top_k[nucleus]
        C = min(V, int(k_n.max()) if k_n.all() else TOP_P_CANDIDATES)  # with top-k, its k tokens hold all the mass
        p = probs[nucleus]
        cand = np.argpartition(-p, C - 1, axis=1)[:, :C] if C < V else np.tile(np.arange(V), (len(nucleus), 1))
        for j, row in enumerate(nucleus):
            total = p[j].sum(dtype=np.float64)
            order = cand[j][np.argsort(-p[j, cand[j]], kind="stable")]
            cum = np.cumsum(p[j, order], dtype=np.float64)
            if cum[-1] < top_p[row] * total:  # the candidates hold too little mass: sort the whole row
                order = np.argsort(-p[j], kind="stable")
                cum = np.cumsum(p[j, order], dtype=np.float64)
            keep = int(np.searchsorted(cum, top_p[row] * total)) + 1  # smallest set reaching top_p
            kept = cum[:keep]
            tokens[s[row]] = order[min(int(np.searchsorted(kept, u[row] * kept[-1], side="right")), keep - 1)]
    return tokens


def logprobs_batch(logits: np.ndarray, chosen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of logits (N, V): the chosen tokens' logprobs (N,), and the k most likely ids (N, k) with their logprobs
    (N, k), most likely first."""
    lps = log_softmax(logits)
    n = np.arange(len(logits))
    if k <= 0:
        return lps[n, chosen], np.zeros((len(logits), 0), np.int64), np.zeros((len(logits), 0), np.float32)
    top = np.argpartition(-lps, k - 1, axis=1)[:, :k]
    top_lps = np.take_along_axis(lps, top, axis=1)
    order = np.argsort(-top_lps, axis=1, kind="stable")
    return lps[n, chosen], np.take_along_axis(top, order, axis=1), np.take_along_axis(top_lps, order, axis=1)

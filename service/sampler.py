"""Sampling, over the whole batch at once: logits (N, V) and each row's parameters -> N token ids, plus logprobs.

Every row draws exactly one uniform number from its own generator per token, and each row's arithmetic is
elementwise or along its own row, so a seeded request gets the same tokens whatever else is in the batch.
"""

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


def _bans_only(row: Row) -> bool:
    """Whether apply_penalties would change nothing of this row but its banned tokens."""
    p = row.params
    counted = bool(row.output_counts) and bool(p.presence_penalty or p.frequency_penalty)
    return p.repetition_penalty == 1.0 and not counted and not p.logit_bias and row.allowed is None


def _argmax_unbanned(logits: np.ndarray, rows: list[Row]) -> np.ndarray:
    """logits (N, V) -> (N,) each row's argmax among its tokens not banned, as apply_penalties then argmax would
    give, without copying the logits: only a row whose argmax is banned (the first of a tie included) looks again."""
    tokens = np.argmax(logits, axis=1)  # (N,)
    for i, row in enumerate(rows):
        if row.banned and int(tokens[i]) in row.banned:
            masked = logits[i].copy()  # (V,)
            masked[list(row.banned)] = -np.inf
            tokens[i] = np.argmax(masked)
    return tokens


def sample_batch(logits: np.ndarray, rows: list[Row]) -> np.ndarray:
    """logits (N, V) float32 -> token ids (N,) int64.

    Greedy rows take the argmax. The others draw from softmax(logits / temperature) restricted by top-k (ties with
    the k-th value kept), min-p and top-p (the smallest most-likely-first set holding top_p of the mass, with the
    tokens tied to its last one), by inverse CDF in vocabulary order with one uniform number. The work runs on as
    few tokens as are exact: a top-k row on its k largest logits (found through the maxima of blocks of BLOCK
    tokens); a top-p row without top-k on its tokens at least NUCLEUS_FLOOR times as likely as its most likely one
    when they hold its nucleus (a peaked distribution, as at the models' usual temperatures), else it sorts only
    the tokens of one probability bucket (_cut_nucleus).
    """
    N, V = logits.shape
    if all(r.params.greedy and _bans_only(r) for r in rows):  # greedy rows, some with banned tokens: no copy
        return _argmax_unbanned(logits, rows)
    logits = apply_penalties(logits, rows)
    s = np.array([i for i, r in enumerate(rows) if not r.params.greedy], np.int64)
    if len(s) < N:
        tokens = np.argmax(logits, axis=1)  # (N,) greedy rows are done
        if not len(s):
            return tokens
    else:
        tokens = np.zeros(N, np.int64)
    temp = np.array([rows[i].params.temperature for i in s], np.float32)
    u = np.array([rows[i].rng.random() for i in s])  # one draw per row, from the row's own generator
    top_k = np.array([rows[i].params.top_k if 0 < rows[i].params.top_k < V else 0 for i in s])
    min_p = np.array([rows[i].params.min_p for i in s], np.float32)
    top_p = np.array([rows[i].params.top_p for i in s])
    k_rows = np.nonzero(top_k)[0]
    if len(k_rows):  # the top k of logits / temperature are the top k of the logits: scale only those
        ids, zk = _top_k_candidates(logits if len(k_rows) == N else logits[s[k_rows]], top_k[k_rows])  # (Nk, C)
        zk = zk / temp[k_rows, None]
        p = np.exp(zk - zk.max(axis=1, keepdims=True))  # (Nk, C) unnormalized; the most likely has 1.0
        p = np.where(p < min_p[k_rows, None], 0.0, p)  # min_p x the top probability
        tokens[s[k_rows]] = _draw(ids, p, top_p[k_rows], u[k_rows])
    full = np.nonzero(top_k == 0)[0]
    if len(full):
        z = (logits if len(full) == N else logits[s[full]]) / temp[full, None]  # (Nf, V) a new array, _draw_full's
        tokens[s[full]] = _draw_full(z, min_p[full], top_p[full], u[full])
    return tokens


BLOCK = 64  # top-k finds a row's k largest logits among the k blocks of this many tokens with the largest maxima
NUCLEUS_FLOOR = 1e-4  # a top-p row without top-k looks for its nucleus among its tokens at least this likely first,
NUCLEUS_MOST = 1024  # when they are at most this many
ONE_BITS = 0x3F800000  # float32 1.0 as bits
NUCLEUS_BUCKETS = (ONE_BITS >> 20) + 1  # top-p sorts only the tokens of the probability bucket reaching its mass


def _top_k_candidates(z: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z (N, V), k (N,) >= 1 -> (ids, values), each (N, C): every token within its row's top k (ties at the k-th
    value included), left-aligned, padding id -1 and value -inf. Exact: the K largest values of a row lie in the K
    blocks (of BLOCK tokens, strided) whose maxima are largest; a tie with a k-th value in a block left out sends the
    rows to a full scan."""
    N, V = z.shape
    K = int(k.max())
    nb = -(-V // BLOCK)
    every_id = np.broadcast_to(np.arange(V), z.shape)
    if K * 4 >= nb:  # a small vocabulary or a large k: one partition of the whole row
        kth = _kth_largest(z, k)
        return _left_aligned(z >= kth[:, None], every_id, z)
    zp = z if V == nb * BLOCK else np.pad(z, ((0, 0), (0, nb * BLOCK - V)), constant_values=-np.inf)
    zs = zp.reshape(N, BLOCK, nb)  # block b = tokens b, b + nb, b + 2 nb, ...: a strided max is one fast pass
    bmax = zs.max(axis=1)  # (N, nb)
    blocks = np.argpartition(-bmax, K - 1, axis=1)[:, :K]  # (N, K) the blocks with the largest maxima
    in_blocks = (blocks[:, None, :] + nb * np.arange(BLOCK)[None, :, None]).reshape(N, BLOCK * K)  # token ids
    vals = np.take_along_axis(zs, blocks[:, None, :], axis=2).reshape(N, BLOCK * K)
    kth = _kth_largest(vals, k)
    left_out = np.ones((N, nb), bool)
    np.put_along_axis(left_out, blocks, False, axis=1)
    if (left_out & (bmax >= kth[:, None])).any():  # a value at or above a k-th in a block left out: ties
        return _left_aligned(z >= kth[:, None], every_id, z)
    return _left_aligned(vals >= kth[:, None], in_blocks, vals)


def _kth_largest(vals: np.ndarray, k: np.ndarray) -> np.ndarray:
    """vals (N, C), k (N,) -> (N,) each row's own k-th largest value (one partition for the largest k of all)."""
    C, K = vals.shape[1], int(k.max())
    top = np.partition(vals, C - K, axis=1)[:, C - K :]  # (N, K) the K largest, unordered
    return -np.sort(-top, axis=1)[np.arange(len(vals)), k - 1]


def _left_aligned(mask: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (ids, vals) where mask (N, C') holds, left-aligned in (N, C) arrays, C the most any row has;
    padding id -1 (never drawn: its value is -inf)."""
    r, c = np.nonzero(mask)  # row-major
    out_ids = np.full((len(mask), int(np.bincount(r, minlength=len(mask)).max())), -1, np.int64)
    out_vals = np.full(out_ids.shape, -np.inf, vals.dtype)
    col = np.arange(len(r)) - np.searchsorted(r, r)  # position within its row
    out_ids[r, col], out_vals[r, col] = ids[r, c], vals[r, c]
    return out_ids, out_vals


def _nucleus_floor(q: np.ndarray, need: np.ndarray, before: np.ndarray | float = 0.0) -> np.ndarray:
    """q (N, C) candidates holding enough mass, need (N,) the mass to reach, before (N,) the mass of the tokens
    already in -> (N,) the probability of the last token of the smallest most-likely-first set reaching need."""
    q = -np.sort(-q, axis=1)  # (N, C) descending
    cum = np.reshape(before, (-1, 1)) + np.cumsum(q, axis=1, dtype=np.float64)
    keep = np.minimum((cum < need[:, None]).sum(axis=1), q.shape[1] - 1)
    return q[np.arange(len(q)), keep]


def _draw(ids: np.ndarray, p: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One token per row from candidate ids (N, C) with unnormalized probabilities p (N, C) (0 = excluded)."""
    N = len(ids)
    nucleus = top_p < 1.0
    if nucleus.any():
        floor = _nucleus_floor(p[nucleus], top_p[nucleus] * p[nucleus].sum(axis=1, dtype=np.float64))
        p[nucleus] = np.where(p[nucleus] >= floor[:, None], p[nucleus], 0.0)
    order = np.argsort(ids, axis=1)  # vocabulary order
    p, ids = np.take_along_axis(p, order, axis=1), np.take_along_axis(ids, order, axis=1)
    cum = np.cumsum(p, axis=1, dtype=np.float64)  # (N, C)
    pick = np.minimum((cum <= (u * cum[:, -1])[:, None]).sum(axis=1), _last_positive(p))
    return ids[np.arange(N), pick]


def _last_positive(p: np.ndarray) -> np.ndarray:
    """p (N, C) -> (N,) the last column with p > 0: where a draw that rounding carried past the last bin lands."""
    return p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)


def _cut_nucleus(p: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """p (N, V) unnormalized, the top 1.0 -> p with every token below its row's top-p cut set to 0. Exact without
    sorting the row: tokens fall into buckets of an eighth of an octave of probability (the float's bits); the
    buckets above the one where the cumulative mass crosses top_p are all in, and only that bucket's tokens are
    sorted to find the cut."""
    p = p.astype(np.float32, copy=False)
    bucket = (ONE_BITS - p.view(np.int32)) >> 20  # (N, V) exponent and top 3 mantissa bits; 0 = the top token
    cut = np.zeros(len(p), np.float32)
    for r in range(len(p)):
        need = top_p[r] * p[r].sum(dtype=np.float64)
        cum = np.cumsum(np.bincount(bucket[r], p[r], NUCLEUS_BUCKETS))  # mass up to each bucket, likeliest first
        cross = min(int((cum < need).sum()), NUCLEUS_BUCKETS - 1)  # the bucket where top_p is reached
        above = cum[cross - 1] if cross > 0 else 0.0  # the mass of the buckets wholly in
        cut[r] = _nucleus_floor(p[r, bucket[r] == cross][None], np.array([need]), above)[0]
    return np.where(p >= cut[:, None], p, np.float32(0.0))


def _draw_full(z: np.ndarray, min_p: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rows without top-k, z (N, V) (overwritten): min-p and top-p cut, then a draw. A top-p row whose nucleus lies
    among its tokens of p >= NUCLEUS_FLOOR is cut and drawn among those alone; the other rows draw by a CDF over
    blocks of BLOCK tokens, then within the block, a top-p one after _cut_nucleus."""
    N, V = z.shape
    # (N, V) unnormalized, the most likely token at 1.0, computed in z's memory; none below e^-87 (float32's smallest
    # normal number, 1.2e-38, is e^-87.3): arithmetic on subnormal numbers is many times slower, and a token that
    # unlikely is never drawn
    p = np.subtract(z, z.max(axis=1, keepdims=True), out=z)
    p = np.exp(np.maximum(p, np.float32(-87.0), out=p), out=p)
    if min_p.any():
        p = np.where(p < min_p[:, None], 0.0, p).astype(np.float32)  # min_p x the top probability
    tokens = np.zeros(N, np.int64)
    blocks = np.ones(N, bool)  # the rows left for the draw over blocks
    nucleus = np.nonzero(top_p < 1.0)[0]
    if len(nucleus):
        pn = p if len(nucleus) == N else p[nucleus]
        inside, drawn = _draw_nucleus_above_floor(pn, top_p[nucleus], u[nucleus])
        tokens[nucleus[inside]], blocks[nucleus[inside]] = drawn, False
        wide = nucleus[~inside]
        if len(wide):
            p[wide] = _cut_nucleus(p[wide], top_p[wide])
    rows = np.nonzero(blocks)[0]
    if len(rows):
        tokens[rows] = _draw_blocks(p if len(rows) == N else p[rows], u[rows])
    return tokens


def _draw_nucleus_above_floor(p: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-p rows, p (n, V) unnormalized with the most likely token at 1.0 -> (inside (n,) bool, a token for each
    inside row). A row is inside when its tokens of p >= NUCLEUS_FLOOR, at most NUCLEUS_MOST of them, hold top_p of
    its whole mass: its nucleus (the most likely tokens down to the one that reaches that mass, and all tied with
    that one) is then among them, exactly, and the draw runs on them alone. The other rows are left to the
    caller."""
    n, V = p.shape
    need = top_p * p.sum(axis=1, dtype=np.float64)  # (n,) the nucleus' mass, of the whole row
    likely = p >= NUCLEUS_FLOOR  # (n, V)
    count = np.count_nonzero(likely, axis=1)  # (n,)
    rows = np.nonzero(count <= NUCLEUS_MOST)[0]  # (m,) the rows worth a look
    inside = np.zeros(n, bool)
    if not len(rows):
        return inside, np.zeros(0, np.int64)
    r, c = np.nonzero(likely if len(rows) == n else likely[rows])  # row-major: (row among the m, token id)
    ids = np.full((len(rows), int(count[rows].max())), -1, np.int64)  # (m, C) left-aligned, padding -1
    ids[r, np.arange(len(r)) - np.searchsorted(r, r)] = c
    q = np.where(ids >= 0, p[rows[:, None], np.maximum(ids, 0)], np.float32(0.0))  # (m, C) their probabilities
    exact = q.sum(axis=1, dtype=np.float64) >= need[rows]  # (m,) the likely tokens hold the nucleus
    inside[rows[exact]] = True
    ids, q, need, u = ids[exact], q[exact], need[rows[exact]], u[rows[exact]]
    floor = _nucleus_floor(q, need)  # the probability of the nucleus' last token
    q = np.where(q >= floor[:, None], q, 0.0)
    return inside, _draw(ids, q, np.ones(len(q)), u)


def _draw_blocks(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One token per row of p (N, V) unnormalized (0 = excluded) by a CDF over blocks of BLOCK tokens, then within
    the block."""
    N, V = p.shape
    nb = -(-V // BLOCK)
    pb = p if V == nb * BLOCK else np.pad(p, ((0, 0), (0, nb * BLOCK - V)))
    pb = pb.reshape(N, nb, BLOCK)
    cb = np.cumsum(pb.sum(axis=2, dtype=np.float64), axis=1)  # (N, nb) mass up to each block's end
    target = u * cb[:, -1]
    blk = np.minimum((cb <= target[:, None]).sum(axis=1), nb - 1)  # the block the draw falls in
    before = np.where(blk > 0, cb[np.arange(N), blk - 1], 0.0)
    inside = pb[np.arange(N), blk]  # (N, BLOCK)
    within = before[:, None] + np.cumsum(inside, axis=1, dtype=np.float64)
    at = np.minimum((within <= target[:, None]).sum(axis=1), _last_positive(inside))
    return np.minimum(blk * BLOCK + at, V - 1)


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

"""Sampling, over the whole batch at once: logits (N, V) and each row's parameters -> N token ids, plus logprobs.

Every row draws exactly one uniform number from its own generator per token, and each row's arithmetic is
elementwise or along its own row, so a seeded request gets the same tokens whatever else is in the batch, up to
rounding: whether a top-p row is drawn by _draw_peaked (numpy) or the C draw depends on how many rows are peaked, and
the two may differ where a cut or the draw falls within rounding of a boundary.

The logits come as an (N, V) host array, or as Candidates: what the device that computed them reduced them to (each
row's K largest logits, its logits at the ids its penalties change, two sums over the row). A row whose draw those
settle exactly is sampled from them alone; the others from the full logits, fetched only then. Whether a row is
settled by its Candidates depends on its own logits and parameters alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import ortkernels


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
        """Temperatures under GREEDY_BELOW are greedy, as vLLM reads them: logits over a smaller one leave float32."""
        return self.temperature < GREEDY_BELOW


GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS
MIN_REPETITION_PENALTY = 1e-6  # a smaller penalty is this one: logits over a smaller one would leave float32


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


def edit_ids(row: Row) -> np.ndarray:
    """(G,) int64: the token ids whose logits the row's penalties, logit_bias and bans change (an id may repeat)."""
    p = row.params
    parts = [np.array(row.banned, np.int64)] if row.banned else []
    if p.logit_bias:
        parts.append(np.array([t for t, _ in p.logit_bias], np.int64))
    if p.repetition_penalty != 1.0:
        parts.append(row.prompt_ids.astype(np.int64))
    if row.output_counts and (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
        parts.append(np.fromiter(row.output_counts, np.int64, len(row.output_counts)))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


KEY = 1 << 32  # (row, token id) pairs as one int64: row * KEY + id


def _keys(rows: list[int], ids: list[np.ndarray]) -> np.ndarray:
    """(row, id) pairs as keys, flat: each row index with each of its ids."""
    return np.concatenate([np.int64(i) * KEY + np.asarray(t, np.int64) for i, t in zip(rows, ids)])


def edited(rows: list[Row], r: np.ndarray, ids: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Logits at (row, id) pairs, r and ids (M,) (an index into rows and a token id), from their raw values z (M,)
    -> (M,) float32 after the rows' penalties: repetition on prompt and output tokens, presence/frequency on output
    tokens, logit_bias last (as OpenAI adds it), then the bans (unless the row's grammar allows nothing else)."""
    z, key = z.astype(np.float32, copy=True), r * KEY + ids

    def counted(row: Row) -> np.ndarray:
        return np.fromiter(row.output_counts, np.int64, len(row.output_counts))

    rep = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if rep:
        m = np.isin(key, _keys(rep, [np.concatenate([rows[i].prompt_ids, counted(rows[i])]) for i in rep]))
        penalty = np.array([max(row.params.repetition_penalty, MIN_REPETITION_PENALTY) for row in rows], np.float32)
        penalty = penalty[r[m]]
        z[m] = np.where(z[m] > 0, z[m] / penalty, z[m] * penalty)
    pen = [
        i
        for i, row in enumerate(rows)
        if row.output_counts and (row.params.presence_penalty or row.params.frequency_penalty)
    ]
    if pen:
        keys = _keys(pen, [counted(rows[i]) for i in pen])
        sub = np.concatenate(
            [
                np.float32(rows[i].params.frequency_penalty)
                * np.fromiter(rows[i].output_counts.values(), np.float32, len(rows[i].output_counts))
                + np.float32(rows[i].params.presence_penalty)
                for i in pen
            ]
        )
        z -= _lookup(keys, sub, key)
    bias = [i for i, row in enumerate(rows) if row.params.logit_bias]
    if bias:
        keys = _keys(bias, [np.array([t for t, _ in rows[i].params.logit_bias]) for i in bias])
        z += _lookup(keys, np.array([b for i in bias for _, b in rows[i].params.logit_bias], np.float32), key)
    ban = [i for i, row in enumerate(rows) if row.banned and _bans_hold(row)]
    if ban:
        z[np.isin(key, _keys(ban, [np.array(rows[i].banned) for i in ban]))] = -np.inf
    return z


def _lookup(keys: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """values (K,) of unique keys (K,), at the keys at (M,) -> (M,) float32, 0 where a key is not among them."""
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.minimum(np.searchsorted(keys, at), len(keys) - 1)
    return np.where(keys[pos] == at, values[pos], np.float32(0.0))


def _bans_hold(row: Row) -> bool:
    """Whether the row's bans apply: not when its grammar allows nothing but banned tokens."""
    return row.allowed is None or row.allowed.sum() > np.count_nonzero(row.allowed[list(row.banned)])


def apply_penalties(logits: np.ndarray, rows: list[Row], private: bool = False) -> np.ndarray:
    """logits (N, V) -> penalized (a copy where anything changes, unless private: then in place): each row's grammar
    mask, and its edited() tokens."""
    edits = [edit_ids(r) for r in rows]
    if not any(len(ids) or r.allowed is not None for ids, r in zip(edits, rows)):
        return logits
    if not private:
        logits = logits.copy()
    _write_edits(logits, logits, np.arange(len(rows)), rows, edits)
    return logits


def _write_edits(
    z: np.ndarray,
    raw: np.ndarray,
    at: np.ndarray,
    rows: list[Row],
    edits: list[np.ndarray],
    temp: np.ndarray | None = None,
) -> None:
    """Into z (n, V), row i of which holds raw[at[i]] (over temp (n,) where given): each row's grammar mask, and its
    edited tokens (edits[i], edit_ids), their values edited() from raw's, the masked ones -inf first (as the mask comes
    before the edits), then over temp: what apply_penalties(raw[at]) / temp gives, bit for bit, without the copy."""
    for i, row in enumerate(rows):
        if row.allowed is not None:
            z[i, ~row.allowed] = -np.inf
    r = np.repeat(np.arange(len(rows)), [len(ids) for ids in edits])  # (M,)
    if not len(r):
        return
    ids = np.concatenate(edits)  # (M,)
    vals = raw[at[r], ids]  # (M,) float32
    for i, row in enumerate(rows):
        if row.allowed is not None:
            m = r == i
            vals[m] = np.where(row.allowed[ids[m]], vals[m], np.float32(-np.inf))
    vals = edited(rows, r, ids, vals)
    z[r, ids] = vals if temp is None else vals / temp[r]


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


@dataclass(frozen=True)
class Candidates:
    """A step's logits (N, V) as the device reduced them, so that a row with the usual parameters needs a few hundred
    numbers on the host instead of V. `full()` brings the logits themselves (N, V), for the rows these do not
    settle: a grammar's mask, plain temperature sampling (no top-k, top-p or min-p), a cut past the K-th token."""

    ids: np.ndarray  # (N, K) int64: the ids of each row's K largest logits, largest first
    values: np.ndarray  # (N, K) float32: those logits
    edit_ids: np.ndarray  # (N, G) int64: each row's edit_ids, padded with -1
    edit_values: np.ndarray  # (N, G) float32: their raw logits
    lse: np.ndarray  # (N,) float32: log-sum-exp of each row
    mass: np.ndarray  # (N,) float32: sum over the row of exp((z - values[:, 0]) * inv_temperature)
    finite: np.ndarray  # (N,) bool: no inf or nan in the row
    full: Callable[[], np.ndarray]  # -> (N, V) float32 on the host

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: np.ndarray | list[int]) -> Candidates:
        """The candidates of some rows, as logits[rows] would select them."""
        rows = np.asarray(rows, np.int64)
        parent = self.full
        return Candidates(
            self.ids[rows],
            self.values[rows],
            self.edit_ids[rows],
            self.edit_values[rows],
            self.lse[rows],
            self.mass[rows],
            self.finite[rows],
            lambda: parent()[rows],
        )


def reduction_inputs(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """What the device needs to reduce a step's logits for these rows: inverse temperatures (N,) float32 (0 for
    greedy rows) and the ids whose raw logits each row's penalties need (N, G) int64, padded with -1."""
    inv_t = np.array([0.0 if r.params.greedy else 1.0 / r.params.temperature for r in rows], np.float32)
    edits = [np.unique(edit_ids(r)) for r in rows]  # each once: the mass of an edited token is corrected once
    out = np.full((len(rows), max(1, max(len(e) for e in edits))), -1, np.int64)
    for i, e in enumerate(edits):
        out[i, : len(e)] = e
    return inv_t, out


def _sample_candidates(c: Candidates, rows: list[Row]) -> np.ndarray:
    """Candidates of N rows -> token ids (N,), each exactly as sample_batch draws it from the full logits (up to
    rounding): from the union of the row's K largest logits and its edited ones, when every token outside that
    union (whose logit is at most the K-th largest, unedited) is sure to be out of the draw; the other rows from
    the full logits."""
    N, K = c.ids.shape
    has = c.edit_ids >= 0  # (N, G) each row's edited tokens
    r = np.nonzero(has)[0]
    raw_edits = np.where(has, c.edit_values, -np.inf).astype(np.float32)  # (N, G) before and after the edits
    new_edits = np.full(has.shape, -np.inf, np.float32)
    new_edits[has] = edited(rows, r, c.edit_ids[has], c.edit_values[has])
    z = c.values.copy()  # (N, K) the candidates' edited logits: an edited token among them takes its new value
    cand = (np.arange(N)[:, None] * KEY + c.ids).ravel()  # (N K,)
    order = np.argsort(cand)
    want = r * KEY + c.edit_ids[has]
    pos = np.minimum(np.searchsorted(cand[order], want), len(cand) - 1)
    among = cand[order][pos] == want  # an edited token that is a candidate
    z.ravel()[order[pos[among]]] = new_edits[has][among]
    outside = has.copy()
    outside[has] = ~among
    ids = np.concatenate([c.ids, np.where(outside, c.edit_ids, -1)], axis=1)  # (N, C) the union, padding -1
    z = np.concatenate([z, np.where(outside, new_edits, -np.inf).astype(np.float32)], axis=1)  # (N, C)
    bound = c.values[:, -1].astype(np.float64)  # (N,) no token outside a row's union has a larger logit
    top = z.max(axis=1).astype(np.float64)  # (N,) the largest edited logit of the union
    exact = (top > bound) & np.array([row.allowed is None for row in rows])
    greedy = np.array([r.params.greedy for r in rows])
    tokens = np.zeros(N, np.int64)
    g = np.nonzero(exact & greedy)[0]
    if len(g):  # the largest edited logit, the lowest id among ties (as argmax)
        tokens[g] = np.where(z[g] == top[g, None].astype(np.float32), ids[g], np.iinfo(np.int64).max).min(axis=1)
    s = np.nonzero(~greedy)[0]
    if len(s):
        edits = raw_edits[s], new_edits[s]
        sampled = _draw_candidates(c[s], [rows[i] for i in s], ids[s], z[s], top[s], bound[s], edits, exact[s])
        done = sampled >= 0
        tokens[s[done]] = sampled[done]
        exact[s] = done
    rest = np.nonzero(~exact)[0]
    if len(rest):
        tokens[rest] = sample_batch(c.full()[rest], [rows[i] for i in rest])
    return tokens


def _draw_candidates(
    c: Candidates,
    rows: list[Row],
    ids: np.ndarray,
    z: np.ndarray,
    top: np.ndarray,
    bound: np.ndarray,
    edits: tuple[np.ndarray, np.ndarray],
    exact: np.ndarray,
) -> np.ndarray:
    """Sampled rows: ids, z (n, C) the union and its edited logits, top (n,) its largest, bound (n,) the largest
    logit outside it, edits (n, G) x 2 the edited tokens' logits before and after -> a token per row, or
    -1 where the union does not settle the draw (its generator then left untouched)."""
    n, C = z.shape
    raw_edits, new_edits = edits
    inv_t = np.array([1.0 / r.params.temperature for r in rows])  # (n,)
    top_k = np.array([r.params.top_k for r in rows])
    min_p = np.array([r.params.min_p for r in rows])
    top_p = np.array([r.params.top_p for r in rows])
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp((z - top[:, None]) * inv_t[:, None])  # (n, C) float64, the union's largest at 1.0
        p_out = np.exp((bound - top) * inv_t)  # (n,) no token outside the union is as likely as this
        q = np.zeros_like(p)
        ok = np.zeros(n, bool)
        k_rows = exact & (top_k > 0) & (top_k <= C)  # top-k: its k-th largest edited logit above the bound
        if k_rows.any():
            kth = np.full(n, np.inf)
            kth[k_rows] = -np.sort(-z[k_rows], axis=1)[np.arange(k_rows.sum()), top_k[k_rows] - 1]
            k_ok = k_rows & (kth > bound)
            q[k_ok] = np.where(z[k_ok] >= kth[k_ok, None].astype(np.float32), p[k_ok], 0.0)
            ok |= k_ok
        m_rows = exact & (top_k == 0) & (min_p > 0) & (p_out < min_p)  # min-p: every token outside under the cut
        q[m_rows] = p[m_rows]
        ok |= m_rows
        q[ok] = np.where(q[ok] < min_p[ok, None], 0.0, q[ok])
        t_rows = exact & (top_k == 0) & (min_p == 0) & (top_p < 1.0)  # top-p alone: the row's whole mass is needed
        if t_rows.any():
            r = np.nonzero(t_rows)[0]
            z0 = c.values[r, 0].astype(np.float64)
            mass = c.mass[r] * np.exp((z0 - top[r]) * inv_t[r])  # (t,) the raw row's mass, the union's top at 1.0
            removed = np.exp((raw_edits[r] - top[r, None]) * inv_t[r, None]).sum(axis=1)
            added = np.exp((new_edits[r] - top[r, None]) * inv_t[r, None]).sum(axis=1)
            fine = np.isfinite(mass) & (removed <= 0.5 * mass)  # no cancellation in mass - removed
            floor = _nucleus_floor(p[r], top_p[r] * (mass - removed + added))
            settled = fine & (floor > p_out[r])  # the nucleus' last token more likely than any outside
            r = r[settled]
            q[r] = np.where(p[r] >= floor[settled, None], p[r], 0.0)
            top_p = np.where(t_rows, 1.0, top_p)  # the cut is made
            ok[r] = True
    tokens = np.full(n, -1, np.int64)
    d = np.nonzero(ok)[0]
    if len(d):
        u = np.array([rows[i].rng.random() for i in d])
        tokens[d] = _draw(ids[d], q[d], top_p[d], u)
    return tokens


def sample_batch(logits: np.ndarray | Candidates, rows: list[Row]) -> np.ndarray:
    """logits (N, V) float32 (or their Candidates) -> token ids (N,) int64.

    Greedy rows take the argmax. The others draw from softmax(logits / temperature) restricted by top-k (ties with
    the k-th value kept), min-p and top-p (the smallest most-likely-first set holding top_p of the mass, with the
    tokens tied to its last one), by inverse CDF in vocabulary order with one uniform number. The work runs on as
    few tokens as are exact: a top-k row on its k largest logits (found through the maxima of blocks of BLOCK
    tokens); a top-p row without top-k on its tokens at least NUCLEUS_FLOOR times as likely as its most likely one
    when they hold its nucleus (a peaked distribution, as at the models' usual temperatures; where the row is
    peaked enough, without computing the others' probabilities at all: _draw_peaked), else it sorts only the
    tokens of one probability bucket (_cut_nucleus). Where ortkernels/ is built, the rows left after _draw_peaked
    are drawn by its SampleRows (C: the same method in five passes over a row, the exponentials in vectors) instead.
    """
    if isinstance(logits, Candidates):
        return _sample_candidates(logits, rows)
    N, V = logits.shape
    if all(r.params.greedy and _bans_only(r) for r in rows):  # greedy rows, some with banned tokens: no copy
        return _argmax_unbanned(logits, rows)
    s = np.array([i for i, r in enumerate(rows) if not r.params.greedy], np.int64)
    tokens = np.zeros(N, np.int64)
    if len(s) < N:  # the greedy rows, penalized: their argmax
        g = np.array([i for i, r in enumerate(rows) if r.params.greedy], np.int64)
        pen = apply_penalties(logits[g], [rows[i] for i in g], private=True)  # (Ng, V)
        tokens[g] = np.argmax(pen, axis=1)
        if not len(s):
            return tokens
    temp = np.array([rows[i].params.temperature for i in s], np.float32)
    u = np.array([rows[i].rng.random() for i in s])  # one draw per row, from the row's own generator
    top_k = np.array([rows[i].params.top_k if 0 < rows[i].params.top_k < V else 0 for i in s])
    min_p = np.array([rows[i].params.min_p for i in s], np.float32)
    top_p = np.array([rows[i].params.top_p for i in s])
    k_rows = np.nonzero(top_k)[0]
    if len(k_rows):  # the top k of logits / temperature are the top k of the logits: scale only those
        zk = logits if len(k_rows) == N else logits[s[k_rows]]  # (Nk, V) penalized next, in place where a copy
        zk = apply_penalties(zk, [rows[i] for i in s[k_rows]], private=zk is not logits)
        ids, zk = _top_k_candidates(zk, top_k[k_rows])  # (Nk, C)
        zk = zk / temp[k_rows, None]
        p = np.exp(zk - zk.max(axis=1, keepdims=True))  # (Nk, C) unnormalized; the most likely has 1.0
        p = np.where(p < min_p[k_rows, None], 0.0, p)  # min_p x the top probability
        tokens[s[k_rows]] = _draw(ids, p, top_p[k_rows], u[k_rows])
    full = np.nonzero(top_k == 0)[0]
    if len(full):
        z = (logits if len(full) == N else logits[s[full]]) / temp[full, None]  # (Nf, V) a new array, _draw_full's
        fr = [rows[i] for i in s[full]]
        _write_edits(z, logits, s[full], fr, [edit_ids(r) for r in fr], temp[full])  # penalized, as if before
        tokens[s[full]] = _draw_full(z, min_p[full], top_p[full], u[full])
    return tokens


NATIVE = True  # rows needing every token's probability are drawn by ortkernels.sample_rows where it is built
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


def _left_aligned(
    mask: np.ndarray, ids: np.ndarray, vals: np.ndarray, fill: float = -np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (ids, vals) where mask (N, C') holds, left-aligned in (N, C) arrays, C the most any row has (at
    least 1); padding id -1, value `fill` (-inf: never drawn)."""
    r, c = _nonzero_rows(mask)
    out_ids = np.full((len(mask), max(int(np.bincount(r, minlength=len(mask)).max()), 1)), -1, np.int64)
    out_vals = np.full(out_ids.shape, fill, vals.dtype)
    col = np.arange(len(r)) - np.searchsorted(r, r)  # position within its row
    out_ids[r, col], out_vals[r, col] = ids[r, c], vals[r, c]
    return out_ids, out_vals


def _left_aligned_ids(mask: np.ndarray, most: int) -> np.ndarray:
    """mask (m, V) -> (m, most) int64: each row's token ids where mask holds, ascending and left-aligned, padding -1
    (most: the largest count of any row)."""
    r, c = _nonzero_rows(mask)  # row-major: ids ascend within a row
    ids = np.full((len(mask), most), -1, np.int64)
    ids[r, np.arange(len(r)) - np.searchsorted(r, r)] = c
    return ids


def _nonzero_rows(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a 2-D mask (N, C) -> (rows, columns), row-major, through the flat indices: numpy's own 2-D
    nonzero takes 2.3 ms over a 16 x 49,152 mask where this takes 0.14."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _count_rows(mask: np.ndarray) -> np.ndarray:
    """mask (N, C) -> (N,) each row's count of True: row by row, numpy's count_nonzero of a whole row takes 0.04 ms
    over 16 x 49,152 where its axis=1 form takes 0.25."""
    return np.fromiter((np.count_nonzero(row) for row in mask), np.int64, len(mask))


def _nucleus_floor(
    q: np.ndarray, need: np.ndarray, before: np.ndarray | float = 0.0, count: np.ndarray | None = None
) -> np.ndarray:
    """q (N, C) candidates holding enough mass (count (N,) of them real in each row, the rest 0-padding), need (N,)
    the mass to reach, before (N,) the mass of the tokens already in -> (N,) the probability of the last token of
    the smallest most-likely-first set reaching need."""
    q = -np.sort(-q, axis=1)  # (N, C) descending
    cum = np.reshape(before, (-1, 1)) + np.cumsum(q, axis=1, dtype=np.float64)
    last = q.shape[1] - 1 if count is None else np.maximum(count - 1, 0)
    keep = np.minimum((cum < need[:, None]).sum(axis=1), last)
    return q[np.arange(len(q)), keep]


def _draw(ids: np.ndarray, p: np.ndarray, top_p: np.ndarray, u: np.ndarray, ordered: bool = False) -> np.ndarray:
    """One token per row from candidate ids (N, C) with unnormalized probabilities p (N, C) (0 = excluded); ordered:
    each row's ids already ascend (its padding, of p 0, last)."""
    N = len(ids)
    nucleus = top_p < 1.0
    if nucleus.any():
        floor = _nucleus_floor(p[nucleus], top_p[nucleus] * p[nucleus].sum(axis=1, dtype=np.float64))
        p[nucleus] = np.where(p[nucleus] >= floor[:, None], p[nucleus], 0.0)
    if not ordered:  # vocabulary order
        order = np.argsort(ids, axis=1)
        p, ids = np.take_along_axis(p, order, axis=1), np.take_along_axis(ids, order, axis=1)
    cum = np.cumsum(p, axis=1, dtype=np.float64)  # (N, C)
    pick = np.minimum((cum <= (u * cum[:, -1])[:, None]).sum(axis=1), _last_positive(p))
    return ids[np.arange(N), pick]


def _last_positive(p: np.ndarray) -> np.ndarray:
    """p (N, C) -> (N,) the last column with p > 0: where a draw that rounding carried past the last bin lands."""
    return p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)


def _cut_nucleus(p: np.ndarray, top_p: np.ndarray, need: np.ndarray | None = None) -> np.ndarray:
    """p (N, V) unnormalized float32, the top 1.0 -> p itself, every token below its row's top-p cut set to 0 (in
    place); need (N,) the nucleus' mass where the caller has it. Exact without sorting a row: tokens fall into
    buckets of an eighth of an octave of probability (the float's bits); the buckets above the one where the
    cumulative mass crosses top_p are all in, and only that bucket's tokens are sorted to find the cut. All rows at
    once, in few passes over (N, V): at 16 rows a pass costs about a millisecond."""
    N, V = p.shape
    if need is None:
        need = top_p * p.sum(axis=1, dtype=np.float64)  # (N,)
    first = NUCLEUS_BUCKETS * np.arange(N, dtype=np.int64)  # (N,) each row's first bin
    keys = np.subtract((ONE_BITS + (first << 20))[:, None], p.view(np.int32), dtype=np.int64)  # (N, V)
    keys >>= 20  # the row's first bin + its bucket: exponent and top 3 mantissa bits below 1.0 (0 = the top token's)
    mass = np.bincount(keys.ravel(), p.ravel(), N * NUCLEUS_BUCKETS).reshape(N, NUCLEUS_BUCKETS)
    cum = np.cumsum(mass, axis=1)  # (N, NUCLEUS_BUCKETS) mass up to each bucket, likeliest first
    cross = np.minimum((cum < need[:, None]).sum(axis=1), NUCLEUS_BUCKETS - 1)  # (N,) where top_p is reached
    above = np.where(cross > 0, cum[np.arange(N), np.maximum(cross - 1, 0)], 0.0)  # the buckets wholly in
    crossing = keys == (first + cross)[:, None]  # (N, V) the crossing bucket's tokens
    ids, q = _left_aligned(crossing, np.broadcast_to(np.arange(V), p.shape), p, fill=0.0)  # (N, C) each
    cut = _nucleus_floor(q, need, above, (ids >= 0).sum(axis=1))  # (N,)
    return np.multiply(p, p >= cut[:, None], out=p)


def _draw_full(z: np.ndarray, min_p: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rows without top-k, z (N, V) (overwritten): min-p and top-p cut, then a draw. A peaked top-p row is drawn
    from its tokens near the top alone (_draw_peaked); of the others, a top-p row whose nucleus lies among its tokens
    of p >= NUCLEUS_FLOOR is cut and drawn among those alone; the rest draw by a CDF over blocks of BLOCK tokens,
    then within the block, a top-p one after _cut_nucleus."""
    N, V = z.shape
    zmax = z.max(axis=1, keepdims=True)  # (N, 1)
    tokens = np.zeros(N, np.int64)
    nucleus = np.nonzero(top_p < 1.0)[0]
    if len(nucleus):
        zn = z if len(nucleus) == N else z[nucleus]
        peaked, drawn = _draw_peaked(zn, zmax[nucleus], min_p[nucleus], top_p[nucleus], u[nucleus])
        tokens[nucleus[peaked]] = drawn
        if peaked.all() and len(nucleus) == N:
            return tokens
        left = np.setdiff1d(np.arange(N), nucleus[peaked])  # (n,) the rows still to draw
        if len(left) < N:
            z, zmax, min_p, top_p, u = z[left], zmax[left], min_p[left], top_p[left], u[left]
    else:
        left = np.arange(N)
    if NATIVE:  # the same draw in ortkernels/ (C, its exponentials in vectors), where the library is built
        native = ortkernels.sample_rows(np.ascontiguousarray(z, np.float32), min_p, top_p, u)
        if native is not None:
            tokens[left] = native
            return tokens
    # (n, V) unnormalized, the most likely token at 1.0, computed in z's memory; none below e^-87 (float32's smallest
    # normal number, 1.2e-38, is e^-87.3): arithmetic on subnormal numbers is many times slower, and a token that
    # unlikely is never drawn
    p = np.subtract(z, zmax, out=z)
    if p.min() < -87.0:  # (a row's logits spanning less than 87 temperatures, as at 1.0, need no clamp)
        np.maximum(p, np.float32(-87.0), out=p)
    p = np.exp(p, out=p)
    if min_p.any():
        p = np.where(p < min_p[:, None], 0.0, p).astype(np.float32)  # min_p x the top probability
    n = len(left)
    drawn = np.zeros(n, np.int64)
    blocks = np.ones(n, bool)  # the rows left for the draw over blocks
    nucleus = np.nonzero(top_p < 1.0)[0]
    if len(nucleus):
        pn = p if len(nucleus) == n else p[nucleus]
        need = top_p[nucleus] * pn.sum(axis=1, dtype=np.float64)  # (m,) the nucleus' mass, of the whole row
        inside, got = _draw_nucleus_above_floor(pn, top_p[nucleus], u[nucleus], need)
        drawn[nucleus[inside]], blocks[nucleus[inside]] = got, False
        wide = nucleus[~inside]
        if len(wide) == n:
            _cut_nucleus(p, top_p, need)
        elif len(wide):
            p[wide] = _cut_nucleus(p[wide], top_p[wide], need[~inside])
    rows = np.nonzero(blocks)[0]
    if len(rows):
        drawn[rows] = _draw_blocks(p if len(rows) == n else p[rows], u[rows])
    tokens[left] = drawn
    return tokens


PEAK_SPAN = np.float32(20.0)  # _draw_peaked looks at the tokens within e^-20 of a row's most likely one,
PEAK_MOST = 1024  # when they are at most this many
PEAK_TAIL = float(np.exp(np.float64(-20.0)) * 1.001)  # above any probability a token further away gets in float32


def _draw_peaked(
    z: np.ndarray, zmax: np.ndarray, min_p: np.ndarray, top_p: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-p rows, z (n, V) logits over temperature, zmax (n, 1) their maxima -> (peaked (n,) bool, a token for each
    peaked row): the token _draw_nucleus_above_floor would draw, bit for bit, without the exponential of every token.

    A row's whole mass, which the nucleus' need (top_p of it) is taken from, lies between that of its tokens within
    PEAK_SPAN of the top (z >= zmax - 20) and that plus e^-20 for each of the others (none where min_p cuts them).
    Where every need in that interval gives the same cut among the row's tokens of p >= NUCLEUS_FLOOR, and those hold
    it, the cut, its floor and the draw are what the whole row's mass gives: the row is peaked (at SmolLM2's
    temperature 0.2 a few dozen tokens, where the exponentials of the row cost 16 rows about 2 ms). The others are
    left to the caller."""
    n, V = z.shape
    peaked = np.zeros(n, bool)
    near = z >= zmax - PEAK_SPAN  # (n, V)
    count = _count_rows(near)  # (n,)
    rows = np.nonzero(count <= PEAK_MOST)[0]  # (m,)
    if 2 * len(rows) < n:  # too few to pay for this beside the other rows' exponentials (T 0.7: 2 of 16, 1.15x slower)
        return peaked, np.zeros(0, np.int64)
    ids = _left_aligned_ids(near if len(rows) == n else near[rows], int(count[rows].max()))  # (m, C)
    # their probabilities exactly as _draw_full computes them: (z - zmax), clamped at -87, exp; then min-p
    q = np.subtract(z[rows[:, None], np.maximum(ids, 0)], zmax[rows], dtype=np.float32)  # (m, C)
    q = np.exp(np.maximum(q, np.float32(-87.0)))
    q = np.where((ids >= 0) & ~(q < min_p[rows, None]), q, np.float32(0.0))
    tail = np.where(min_p[rows] > PEAK_TAIL, 0.0, (V - count[rows]) * PEAK_TAIL)  # (m,) the others' mass at most
    total = q.sum(axis=1, dtype=np.float64)
    lo, hi = top_p[rows] * total * (1 - 1e-9), top_p[rows] * (total + tail) * (1 + 1e-9)  # (m,) the need's bounds
    likely = q >= NUCLEUS_FLOOR  # (m, C) as _draw_nucleus_above_floor takes them
    ql = np.where(likely, q, np.float32(0.0))
    cum = np.cumsum(-np.sort(-ql, axis=1), axis=1, dtype=np.float64)  # (m, C) descending, as _nucleus_floor sums
    same = (cum < lo[:, None]).sum(axis=1) == (cum < hi[:, None]).sum(axis=1)  # no partial sum between the bounds
    fits = likely.sum(axis=1) <= NUCLEUS_MOST
    ok = same & fits & (ql.sum(axis=1, dtype=np.float64) >= hi)  # the likely tokens hold the nucleus
    if not ok.any():
        return peaked, np.zeros(0, np.int64)
    peaked[rows[ok]] = True
    ids, ql, lo = ids[ok], ql[ok], lo[ok]
    # the likely tokens alone, left-aligned, ascending (as _draw_nucleus_above_floor holds them), and the cut
    lids, lq = _left_aligned(ql > 0, ids, ql, fill=0.0)
    floor = _nucleus_floor(lq, lo)
    lq = np.where(lq >= floor[:, None], lq, 0.0)
    return peaked, _draw(lids, lq, np.ones(len(lq)), u[rows[ok]], ordered=True)


def _draw_nucleus_above_floor(
    p: np.ndarray, top_p: np.ndarray, u: np.ndarray, need: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-p rows, p (n, V) unnormalized with the most likely token at 1.0 -> (inside (n,) bool, a token for each
    inside row). A row is inside when its tokens of p >= NUCLEUS_FLOOR, at most NUCLEUS_MOST of them, hold top_p of
    its whole mass: its nucleus (the most likely tokens down to the one that reaches that mass, and all tied with
    that one) is then among them, exactly, and the draw runs on them alone. The other rows are left to the
    caller. need (n,): the nucleus' mass, top_p of the whole row's, where the caller has it."""
    n, V = p.shape
    if need is None:
        need = top_p * p.sum(axis=1, dtype=np.float64)  # (n,)
    likely = p >= NUCLEUS_FLOOR  # (n, V)
    count = _count_rows(likely)  # (n,)
    rows = np.nonzero(count <= NUCLEUS_MOST)[0]  # (m,) the rows worth a look
    inside = np.zeros(n, bool)
    if not len(rows):
        return inside, np.zeros(0, np.int64)
    ids = _left_aligned_ids(likely if len(rows) == n else likely[rows], int(count[rows].max()))  # (m, C)
    q = np.where(ids >= 0, p[rows[:, None], np.maximum(ids, 0)], np.float32(0.0))  # (m, C) their probabilities
    exact = q.sum(axis=1, dtype=np.float64) >= need[rows]  # (m,) the likely tokens hold the nucleus
    inside[rows[exact]] = True
    ids, q, need, u = ids[exact], q[exact], need[rows[exact]], u[rows[exact]]
    floor = _nucleus_floor(q, need)  # the probability of the nucleus' last token
    q = np.where(q >= floor[:, None], q, 0.0)
    return inside, _draw(ids, q, np.ones(len(q)), u, ordered=True)


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


def logprobs_batch(
    logits: np.ndarray | Candidates, chosen: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of logits (N, V) (or their Candidates): the chosen tokens' logprobs (N,), and the k most likely ids (N, k)
    with their logprobs (N, k), most likely first."""
    if isinstance(logits, Candidates):  # from the K largest, where they hold the chosen token and the top k
        c = logits
        hit = c.ids == chosen[:, None]  # (N, K)
        here = hit.any(axis=1) & (k < c.ids.shape[1])
        lp = np.zeros(len(c), np.float32)
        lp[here] = c.values[hit & here[:, None]] - c.lse[here]
        top_ids, top_lps = c.ids[:, :k].copy(), c.values[:, :k] - c.lse[:, None]
        rest = np.nonzero(~here)[0]
        if len(rest):
            lp[rest], top_ids[rest], top_lps[rest] = logprobs_batch(c.full()[rest], chosen[rest], k)
        return lp, top_ids, top_lps
    lps = log_softmax(logits)
    n = np.arange(len(logits))
    if k <= 0:
        return lps[n, chosen], np.zeros((len(logits), 0), np.int64), np.zeros((len(logits), 0), np.float32)
    top = np.argpartition(-lps, k - 1, axis=1)[:, :k]
    top_lps = np.take_along_axis(lps, top, axis=1)
    order = np.argsort(-top_lps, axis=1, kind="stable")
    return lps[n, chosen], np.take_along_axis(top, order, axis=1), np.take_along_axis(top_lps, order, axis=1)

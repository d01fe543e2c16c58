"""Sampling is pure: the same logits, parameters and seed give the same token, alone or in any batch."""

from __future__ import annotations

import numpy as np
import pytest

import ortkernels
from service import sampler
from service.sampler import Row, SamplingParams, _cut_nucleus, log_softmax, logprobs_batch, sample_batch, top_logprobs

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, 2.9], dtype=np.float32)
NONE = np.zeros(0, dtype=np.int64)


def sample(logits, params, rng, counts, prompt, banned=(), allowed=None):
    return int(sample_batch(logits[None], [Row(params, rng, counts, prompt, banned, allowed)])[0])


def draw(params, n=400, seed=0, counts=None):
    rng = np.random.default_rng(seed)
    return [sample(LOGITS, params, rng, counts or {}, NONE) for _ in range(n)]


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(max_tokens=1, temperature=0.0), np.random.default_rng(), {}, NONE) == 1


@pytest.mark.parametrize("native", [True, False])
def test_tiny_temperatures_and_penalties_stay_finite(native, monkeypatch):
    """A temperature under 1e-5 is greedy (as vLLM reads it) and a repetition penalty of 1e-40 divides by 1e-6: the
    logits never leave float32, so a hostile request neither fails the step nor draws at random."""
    monkeypatch.setattr(sampler, "NATIVE", native)
    rng = np.random.default_rng(0)
    wide = np.random.default_rng(1).normal(size=(4, 1000)).astype(np.float32)
    for top_p in (1.0, 0.5):
        tiny = SamplingParams(max_tokens=1, temperature=1e-40, top_p=top_p)
        assert sample(wide[0], tiny, rng, {}, NONE) == int(np.argmax(wide[0]))
    for top_p in (1.0, 0.5):
        penalized = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, repetition_penalty=1e-40)
        best = int(np.argmax(wide[1]))  # a positive logit divided by 1e-6: the only likely token
        assert sample(wide[1], penalized, rng, {}, np.array([best], np.int64)) == best
    greedy = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1e-40)
    assert sample(wide[2], greedy, rng, {}, np.array([5], np.int64)) in range(1000)


def test_top_k_limits_the_support():
    assert set(draw(SamplingParams(max_tokens=1, temperature=1.0, top_k=2))) == {1, 4}


def test_top_p_keeps_the_smallest_nucleus():
    p = np.exp(log_softmax(LOGITS))
    assert p[1] < 0.5 < p[1] + p[4]
    assert set(draw(SamplingParams(max_tokens=1, top_p=0.5))) == {1, 4}


def test_min_p_drops_unlikely_tokens():
    assert set(draw(SamplingParams(max_tokens=1, min_p=0.3))) == {1, 2, 4}


def test_penalties_move_mass_away_from_repeated_tokens():
    greedy = SamplingParams(max_tokens=1, temperature=0.0, frequency_penalty=1.0)
    assert sample(LOGITS, greedy, np.random.default_rng(), {1: 1}, NONE) == 4
    rep = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=2.0)
    assert sample(LOGITS, rep, np.random.default_rng(), {}, np.array([1, 4])) == 2


def test_same_seed_same_draws_and_banned_tokens_never_drawn():
    params = SamplingParams(max_tokens=1, temperature=1.5)
    assert draw(params, seed=7) == draw(params, seed=7)
    assert draw(params, seed=7) != draw(params, seed=8)
    rng = np.random.default_rng(0)
    assert all(sample(LOGITS, params, rng, {}, NONE, banned=(1,)) != 1 for _ in range(200))


def test_top_logprobs_sorted_and_normalized():
    lps = log_softmax(LOGITS)
    assert np.isclose(np.exp(lps).sum(), 1.0)
    top = top_logprobs(lps, 3)
    assert [i for i, _ in top] == [1, 4, 2] and top[0][1] >= top[1][1] >= top[2][1]


def test_a_seeded_row_draws_the_same_tokens_whatever_else_is_in_the_batch():
    rng = np.random.default_rng(5)
    V = 3000
    logits = rng.normal(size=(8, V)).astype(np.float32) * 3
    kinds = [
        SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=1.2, top_k=40),
        SamplingParams(max_tokens=1, temperature=1.0, min_p=0.05, frequency_penalty=0.5),
        SamplingParams(max_tokens=1, temperature=0.7, repetition_penalty=1.3, logit_bias=((7, 5.0),)),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, top_k=100),
        SamplingParams(max_tokens=1, temperature=3.0, top_p=0.95),  # a wide nucleus: the bucket cut, alone or not
        SamplingParams(max_tokens=1, temperature=0.2, top_p=0.9),  # a peaked one: drawn among its likely tokens
    ]
    counts = [{}, {}, {}, {3: 2, 9: 1}, {4: 1}, {}, {}, {}]
    prompt = np.array([1, 2, 3], np.int64)

    def rows(seed_offset):
        return [
            Row(p, np.random.default_rng([11, i + seed_offset]), c, prompt)
            for i, (p, c) in enumerate(zip(kinds, counts))
        ]

    alone = [int(sample_batch(logits[i : i + 1], [rows(0)[i]])[0]) for i in range(8)]
    together = [int(t) for t in sample_batch(logits, rows(0))]
    assert together == alone
    # the same rows in another order and beside strangers
    order = [5, 2, 7, 0, 4, 6, 1, 3]
    mixed = sample_batch(np.concatenate([logits[order], logits[:2]]), [rows(0)[i] for i in order] + rows(100)[:2])
    assert [int(mixed[j]) for j in range(8)] == [alone[i] for i in order]
    # top-p rows only, wide beside peaked: each row's cut is its own
    wide = [6, 7, 0, 6]
    assert [int(t) for t in sample_batch(logits[wide], [rows(0)[i] for i in wide])] == [alone[i] for i in wide]


def test_batched_logprobs_match_the_row_by_row_ones():
    logits = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    chosen, top_ids, top_lps = logprobs_batch(logits, np.array([4, 0, 49]), 5)
    for i, token in enumerate([4, 0, 49]):
        lps = log_softmax(logits[i])
        assert np.isclose(chosen[i], lps[token])
        assert [t for t, _ in top_logprobs(lps, 5)] == list(top_ids[i])


def reference_support(logits, params):
    """The tokens a row may draw, by full sorts: top-k (ties kept), min-p, then top-p (ties with the last kept)."""
    z = logits.astype(np.float64) / params.temperature
    p = np.exp(z - z.max())
    if params.top_k:
        p[z < np.sort(z)[::-1][params.top_k - 1]] = 0.0
    if params.min_p:
        p[p < params.min_p * p.max()] = 0.0
    if params.top_p < 1.0:
        q = np.sort(p)[::-1]
        cum = np.cumsum(q)
        p[p < q[min(int((cum < params.top_p * p.sum()).sum()), len(q) - 1)]] = 0.0
    return p / p.sum()


@pytest.mark.parametrize("V", [16384, 3001])  # 16384: top-k goes through blocks
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=1, temperature=0.8, top_k=50),
        SamplingParams(max_tokens=1, temperature=0.8, top_k=50, top_p=0.9),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9),
        SamplingParams(max_tokens=1, temperature=1.3, top_p=0.5, min_p=0.01),
        SamplingParams(max_tokens=1, temperature=0.7),
        SamplingParams(max_tokens=1, temperature=1.0, min_p=0.2),
        SamplingParams(max_tokens=1, temperature=0.2, top_p=0.9),  # SmolLM2's defaults: a nucleus of a few tokens
        SamplingParams(max_tokens=1, temperature=0.6, top_p=0.95, min_p=0.05),
    ],
)
def test_batched_draws_follow_the_exact_distribution(V, params):
    """Many rows of one distribution in one batch: the tokens stay in the exact support and their frequencies
    follow its probabilities (the sampler looks at blocks and buckets of tokens; the reference sorts whole rows)."""
    logits = np.random.default_rng(V).normal(size=V).astype(np.float32) * 2.5
    logits[:200] += 4.0  # a head of likely tokens, as a model's logits have
    ref = reference_support(logits, params)
    N = 2000
    rows = [Row(params, np.random.default_rng([3, i]), {}, NONE) for i in range(N)]
    drawn = sample_batch(np.tile(logits, (N, 1)), rows)
    assert ref[drawn].min() > 0, "a token outside the support was drawn"
    freq = np.bincount(drawn, minlength=V) / N
    support = np.nonzero(ref)[0]
    assert np.abs(freq - ref).max() < 5 * np.sqrt(ref.max() / N) + 1e-9
    # total variation over the support, coarse enough for 2,000 draws
    assert 0.5 * np.abs(freq[support] - ref[support]).sum() < 0.05 + 0.5 * np.sqrt(len(support) / N)


def test_ties_at_the_top_k_and_top_p_cuts_are_kept():
    V = 4096
    logits = np.zeros(V, np.float32)
    logits[[5, 700, 3000, 4000]] = 2.0  # four tokens tied at the top, in different blocks
    logits[[1, 2]] = 3.0
    rows = [Row(SamplingParams(max_tokens=1, top_k=3), np.random.default_rng(i), {}, NONE) for i in range(400)]
    assert set(sample_batch(np.tile(logits, (400, 1)), rows).tolist()) == {1, 2, 5, 700, 3000, 4000}
    rows = [Row(SamplingParams(max_tokens=1, top_p=0.004), np.random.default_rng(i), {}, NONE) for i in range(100)]
    assert set(sample_batch(np.tile(logits, (100, 1)), rows).tolist()) == {1, 2}


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_the_nucleus_cut_keeps_exactly_the_reference_nucleus(top_p):
    rng = np.random.default_rng(int(top_p * 1000))
    z = rng.normal(size=(8, 5000)).astype(np.float32) * rng.uniform(0.5, 6.0, size=(8, 1)).astype(np.float32)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    cut = _cut_nucleus(p.copy(), np.full(8, top_p))  # in place
    for r in range(8):
        ref = reference_support(np.log(p[r]), SamplingParams(max_tokens=1, top_p=top_p))
        assert np.array_equal(cut[r] > 0, ref > 0)
        assert np.array_equal(cut[r][cut[r] > 0], p[r][cut[r] > 0])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_a_nucleus_drawn_among_the_likely_tokens_is_exactly_the_reference_nucleus(top_p, monkeypatch):
    """Rows from flat to peaked, and one whose mass lies mostly in a long tail of unlikely tokens: a row whose
    tokens of p >= NUCLEUS_FLOOR hold its nucleus draws among exactly the reference nucleus (ties at the cut
    included); the tail row, whose nucleus needs tokens below the floor once top_p passes 0.8, is left to the
    bucket cut."""
    rng = np.random.default_rng(int(top_p * 1000) + 1)
    scale = np.geomspace(0.3, 40.0, 12).astype(np.float32)[:, None]  # (12, 1) flat rows first, peaked last
    z = rng.normal(size=(12, 5000)).astype(np.float32) * scale
    z[:, rng.integers(0, 5000, 3)] = z.max(axis=1, keepdims=True)  # three tokens tied at the top of each row
    z[0] = np.log(5e-5)  # the tail row: 4,999 tokens at 5e-5 (a fifth of the mass), one at 1
    z[0, 7] = 0.0
    p = np.exp(z - z.max(axis=1, keepdims=True))
    kept: list[np.ndarray] = []  # the tokens each inside row may draw
    draw = sampler._draw
    monkeypatch.setattr(
        sampler, "_draw", lambda ids, q, *a, **k: kept.extend(i[w > 0] for i, w in zip(ids, q)) or draw(ids, q, *a, **k)
    )
    inside, drawn = sampler._draw_nucleus_above_floor(p, np.full(12, top_p), rng.uniform(size=12))
    assert inside[-1] and inside[0] == (top_p * 1.25 <= 1.0)  # the most peaked row is inside; the tail row as said
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
    for r, tokens, token in zip(np.nonzero(inside)[0], kept, drawn):
        support = np.nonzero(reference_support(z[r], params))[0]
        assert np.array_equal(np.sort(tokens), support) and token in support


def test_greedy_rows_with_banned_tokens_take_the_best_token_not_banned():
    """The no-copy greedy path gives what masking a copy and taking its argmax gives: a banned token at the top (or
    tied with the top at a lower id) is passed over, one below the top changes nothing."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 300)).astype(np.float32)
    top = logits.argmax(axis=1)
    logits[3, 7] = logits[3].max()  # row 3: a banned token tied with the top, at a lower id
    banned = [(int(top[0]),), (), (int(top[2]), 11), (7,), ((int(top[4]) + 1) % 300,), (int(top[5]),)]
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    rows = [Row(greedy, np.random.default_rng(i), {}, NONE, b) for i, b in enumerate(banned)]
    want = [int(np.argmax(np.where(np.isin(np.arange(300), b), -np.inf, logits[i]))) for i, b in enumerate(banned)]
    before = logits.copy()
    assert sample_batch(logits, rows).tolist() == want
    assert want[0] != top[0] and want[3] != 7 and want[4] == top[4]
    np.testing.assert_array_equal(logits, before)  # the engine's logits are left as they were


def reduced(logits, rows, K=128):
    """What the engine's reducer returns for these logits (N, V), computed here with full sorts, and a list that
    counts the sampler's fetches of the full logits."""
    inv_t, edits = sampler.reduction_inputs(rows)
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :K]  # (N, K)
    values = np.take_along_axis(logits, ids, axis=1)
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)) + x.max(axis=1)
    mass = np.exp((x - values[:, :1]) * inv_t[:, None]).sum(axis=1)
    edit_values = np.take_along_axis(logits, np.maximum(edits, 0), axis=1)
    fetched = []
    finite = np.isfinite(logits).all(axis=1)
    c = sampler.Candidates(
        ids,
        values,
        edits,
        edit_values,
        lse.astype(np.float32),
        mass.astype(np.float32),
        finite,
        lambda: fetched.append(1) or logits,
    )
    return c, fetched


CANDIDATE_KINDS = [  # (params, output counts, banned ids)
    (SamplingParams(max_tokens=1, temperature=0.0), False, ()),
    (SamplingParams(max_tokens=1, temperature=0.0, frequency_penalty=1.0), True, (3,)),
    (SamplingParams(max_tokens=1, temperature=0.2, top_p=0.9), False, ()),
    (SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9), False, (3,)),
    (SamplingParams(max_tokens=1, temperature=1.0, top_p=0.95), False, ()),
    (SamplingParams(max_tokens=1, temperature=0.8, top_p=0.95, top_k=50, frequency_penalty=0.3), True, (3,)),
    (SamplingParams(max_tokens=1, temperature=1.2, top_k=40), False, ()),
    (SamplingParams(max_tokens=1, temperature=1.0, min_p=0.05, frequency_penalty=0.5), True, ()),
    (
        SamplingParams(max_tokens=1, temperature=0.7, repetition_penalty=1.3, logit_bias=((7, 5.0),), top_p=0.8),
        True,
        (3,),
    ),
    (SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, top_k=100), False, ()),
    (SamplingParams(max_tokens=1, temperature=0.5), False, ()),  # plain temperature: always the full logits
    (SamplingParams(max_tokens=1, temperature=0.3, top_p=0.9, presence_penalty=1.5), True, ()),
]


def test_candidates_give_the_tokens_and_logprobs_of_the_full_logits():
    """Sampling from the reduced logits (each row's 128 largest, its edited tokens' raw logits, its mass) draws what
    the full logits draw, for every kind of row, peaked or flat, with an eos-like token often on top and banned."""
    rng = np.random.default_rng(0)
    V, fetches = 5000, 0
    for trial in range(48):
        logits = (rng.normal(size=(len(CANDIDATE_KINDS), V)) * [1, 3, 6, 10][trial % 4]).astype(np.float32)
        logits[:, 3] += 5 * (trial % 3)
        counts = {int(t): 1 + int(t) % 3 for t in np.argsort(-logits[0])[:20]}
        prompt = rng.integers(0, V, 50)

        def rows(seed, counts=counts, prompt=prompt):
            return [
                Row(p, np.random.default_rng([seed, i]), counts if counted else {}, prompt, banned)
                for i, (p, counted, banned) in enumerate(CANDIDATE_KINDS)
            ]

        want = sample_batch(logits, rows(trial))
        c, fetched = reduced(logits, rows(trial))
        assert sample_batch(c, rows(trial)).tolist() == want.tolist()
        fetches += len(fetched)
        for got, expected in zip(logprobs_batch(c, want, 5), logprobs_batch(logits, want, 5)):
            np.testing.assert_allclose(got, expected, atol=1e-4)
    assert fetches == 48  # once per batch, for the plain-temperature row


@pytest.mark.parametrize(
    "kind", [i for i, (p, _, _) in enumerate(CANDIDATE_KINDS) if p.greedy or p.top_k or p.top_p < 1 or p.min_p]
)
def test_peaked_rows_never_fetch_the_full_logits(kind):
    """At a language model's usual peakedness every kind but plain temperature is settled by the candidates."""
    params, counted, banned = CANDIDATE_KINDS[kind]
    rng = np.random.default_rng(kind)
    logits = (rng.standard_cauchy(size=(8, 5000)) * 2).astype(np.float32)  # a few tokens far above the rest
    rows = [Row(params, np.random.default_rng(i), {5: 1} if counted else {}, NONE, banned) for i in range(8)]
    c, fetched = reduced(logits, rows)
    sample_batch(c, rows)
    assert not fetched


def test_reduction_inputs_name_each_rows_edited_ids_once():
    """The device's inputs: each row's edited ids (bans, logit_bias, penalties' prompt and output tokens, repeats
    among them) once each and ascending, padded with -1; inverse temperatures, 0 for greedy rows."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        prompt = rng.integers(0, 40, 30)  # repeats within the prompt, and with the output counts
        counts = {int(t): 1 for t in rng.integers(0, 40, 6)}
        rows = [
            Row(p, np.random.default_rng(i), counts if counted and trial % 2 else {}, prompt, banned)
            for i, (p, counted, banned) in enumerate(CANDIDATE_KINDS[trial % 3 :])
        ]
        inv_t, edits = sampler.reduction_inputs(rows)
        assert edits.shape[1] == max(1, max(len(np.unique(sampler.edit_ids(r))) for r in rows))
        for i, row in enumerate(rows):
            want = np.unique(sampler.edit_ids(row))
            assert edits[i, : len(want)].tolist() == want.tolist() and (edits[i, len(want) :] == -1).all()
            assert inv_t[i] == (0.0 if row.params.greedy else np.float32(1 / row.params.temperature))


@pytest.mark.parametrize("min_p", [0.0, 1e-12, 0.05])
def test_peaked_rows_draw_the_tokens_the_whole_rows_give(min_p, monkeypatch):
    """Rows from very peaked to flat (temperatures 0.05 to 1.5; ties at the top; a last row whose nucleus needs
    tokens below NUCLEUS_FLOOR), many draws each: the rows _draw_peaked takes draw the same tokens, bit for bit, as
    with it turned off (every row then computes all its probabilities), and at low temperatures it takes most rows."""
    rng = np.random.default_rng(11)
    V, N = 8192, 48
    logits = rng.normal(size=(N, V)).astype(np.float32) * 2.5
    logits[:, :40] += rng.uniform(2.0, 9.0, size=(N, 1)).astype(np.float32)  # a head of likely tokens
    logits[5, [3, 17, 4000]] = logits[5].max()  # ties at the top
    logits[-1] = np.float32(1.5 * np.log(5e-5))  # at temperature 1.5: 8,191 tokens at 5e-5 of the top, a third of
    logits[-1, 9] = 0.0  # the mass: a nucleus of 0.9 or more needs them
    temperature = np.geomspace(0.05, 1.5, N)
    top_p = rng.choice([0.5, 0.9, 0.95, 0.999], N)

    def draws(seed: int) -> np.ndarray:
        rows = [
            Row(
                SamplingParams(max_tokens=1, temperature=float(t), top_p=float(p), min_p=min_p),
                np.random.default_rng([seed, i]),
                {},
                NONE,
            )
            for i, (t, p) in enumerate(zip(temperature, top_p))
        ]
        return sample_batch(logits, rows)

    taken = []
    peaked = sampler._draw_peaked
    monkeypatch.setattr(sampler, "_draw_peaked", lambda *a: taken.append(peaked(*a)[0]) or peaked(*a))
    on = np.stack([draws(seed) for seed in range(30)])
    assert taken[0][: N // 3].all() and not taken[0][-4:].any()  # the cool rows are taken, the hottest are not
    monkeypatch.setattr(sampler, "PEAK_MOST", 0)
    monkeypatch.setattr(sampler, "NATIVE", False)  # the whole rows through numpy, as _draw_peaked computes them
    off = np.stack([draws(seed) for seed in range(30)])
    assert np.array_equal(on, off)
    assert sum(len(np.unique(column)) > 1 for column in on.T) >= N // 4  # draws, not one token per row every time


@pytest.mark.skipif(
    ortkernels.sample_rows(np.zeros((0, 1), np.float32), *[np.zeros(0)] * 3) is None,
    reason=f"ortkernels/ is not built: {ortkernels.BUILD_HINT}",
)
@pytest.mark.parametrize("V", [8192, 3001, 5])
def test_the_native_draw_gives_the_tokens_of_the_numpy_one(V, monkeypatch):
    """Rows from peaked to flat (temperatures 0.3 to 2), top-p and min-p mixed, vocabularies a multiple of the
    vectors and not: ortkernels.sample_rows (exponentials in vectors) draws inside each row's exact support, and the
    token numpy draws with the same number in all but a rounding's share of draws."""
    rng = np.random.default_rng(V)
    N = 24
    logits = rng.normal(size=(N, V)).astype(np.float32) * 2.5
    logits[:, : min(40, V)] += rng.uniform(0.0, 9.0, size=(N, 1)).astype(np.float32)
    logits[3, [0, 1, 2][: min(3, V)]] = logits[3].max()  # ties at the top
    params = [
        SamplingParams(max_tokens=1, temperature=float(t), top_p=float(p), min_p=float(m))
        for t, p, m in zip(
            np.geomspace(0.3, 2.0, N), rng.choice([1.0, 0.5, 0.9, 0.95, 0.999], N), rng.choice([0.0, 0.0, 0.05], N)
        )
    ]

    def draws(native: bool, seed: int) -> np.ndarray:
        monkeypatch.setattr(sampler, "NATIVE", native)
        return sample_batch(logits, [Row(q, np.random.default_rng([seed, i]), {}, NONE) for i, q in enumerate(params)])

    native = np.stack([draws(True, seed) for seed in range(30)])  # (30, N)
    numpy = np.stack([draws(False, seed) for seed in range(30)])
    for i, q in enumerate(params):
        assert reference_support(logits[i], q)[native[:, i]].min() > 0, f"row {i}: a token outside the support"
    assert (native == numpy).mean() >= 0.99
    assert sum(len(np.unique(column)) > 1 for column in native.T) >= N // 3  # draws, not one token per row

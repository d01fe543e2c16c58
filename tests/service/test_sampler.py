"""Sampling is pure: the same logits, parameters and seed give the same token, alone or in any batch."""

from __future__ import annotations

import numpy as np

from service.sampler import Row, SamplingParams, log_softmax, logprobs_batch, sample_batch, top_logprobs

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, 2.9], dtype=np.float32)
NONE = np.zeros(0, dtype=np.int64)


def sample(logits, params, rng, counts, prompt, banned=(), allowed=None):
    return int(sample_batch(logits[None], [Row(params, rng, counts, prompt, banned, allowed)])[0])


def draw(params, n=400, seed=0, counts=None):
    rng = np.random.default_rng(seed)
    return [sample(LOGITS, params, rng, counts or {}, NONE) for _ in range(n)]


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(max_tokens=1, temperature=0.0), np.random.default_rng(), {}, NONE) == 1


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
    logits = rng.normal(size=(6, V)).astype(np.float32) * 3
    kinds = [
        SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=1.2, top_k=40),
        SamplingParams(max_tokens=1, temperature=1.0, min_p=0.05, frequency_penalty=0.5),
        SamplingParams(max_tokens=1, temperature=0.7, repetition_penalty=1.3, logit_bias=((7, 5.0),)),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, top_k=100),
    ]
    counts = [{}, {}, {}, {3: 2, 9: 1}, {4: 1}, {}]
    prompt = np.array([1, 2, 3], np.int64)

    def rows(seed_offset):
        return [
            Row(p, np.random.default_rng([11, i + seed_offset]), c, prompt)
            for i, (p, c) in enumerate(zip(kinds, counts))
        ]

    alone = [[int(sample_batch(logits[i : i + 1], [rows(0)[i]])[0]) for i in range(6)] for _ in range(1)][0]
    together = [int(t) for t in sample_batch(logits, rows(0))]
    assert together == alone
    # the same rows in another order and beside strangers
    order = [5, 2, 0, 4, 1, 3]
    mixed = sample_batch(np.concatenate([logits[order], logits[:2]]), [rows(0)[i] for i in order] + rows(100)[:2])
    assert [int(mixed[j]) for j in range(6)] == [alone[i] for i in order]


def test_batched_logprobs_match_the_row_by_row_ones():
    logits = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    chosen, top_ids, top_lps = logprobs_batch(logits, np.array([4, 0, 49]), 5)
    for i, token in enumerate([4, 0, 49]):
        lps = log_softmax(logits[i])
        assert np.isclose(chosen[i], lps[token])
        assert [t for t, _ in top_logprobs(lps, 5)] == list(top_ids[i])

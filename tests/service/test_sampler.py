"""Sampling is pure: the same logits, parameters and seed give the same token."""

from __future__ import annotations

import numpy as np

from service.sampler import SamplingParams, log_softmax, sample, top_logprobs

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, 2.9], dtype=np.float32)
NONE = np.zeros(0, dtype=np.int64)


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

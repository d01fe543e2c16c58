"""PrefixCache.lookup alone: what a second look finds and counts."""

import numpy as np

from service.prefix_cache import PrefixCache


def test_a_second_look_finds_entries_and_counts_only_the_new_tokens():
    cache = PrefixCache(4)
    cache.keep(1, np.arange(100, 140))  # a finished (or cancelled) sequence's slot, kept as an entry
    prompt = np.concatenate([np.arange(100, 130), [7, 8, 9]])
    assert cache.lookup(prompt, {}, again=True, beyond=10) == (1, 30)
    assert (cache.queries, cache.hits) == (0, 20)  # the query was counted at admission; 10 tokens were held already
    assert cache.lookup(prompt, {2: np.arange(100, 125)}, again=True, beyond=30) == (None, 0)  # nothing longer
    assert cache.lookup(prompt, {}) == (1, 30) and (cache.queries, cache.hits) == (len(prompt), 50)

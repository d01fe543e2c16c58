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


def test_borrows_go_to_the_slot_that_holds_the_positions_and_follow_it():
    cache = PrefixCache(6)
    cache.keep(1, np.arange(100, 150))
    assert cache.borrow(2, 1, 40) == 40 and cache.borrowed == {2: (1, 40)}
    # a slot borrowing from a borrower reads from the lender; what lies past the borrow is the source's, to copy
    assert cache.borrow(3, 2, 45) == 40 and cache.borrowed[3] == (1, 40)
    assert cache.borrow(4, 2, 30) == 30 and cache.borrowed[4] == (1, 30)
    assert sorted(cache.borrowers(1)) == [(2, 40), (3, 40), (4, 30)] and cache.shared_positions() == 110
    # taken over only by a prompt keeping every lent position; a borrower taken over keeps what it still matches
    assert not cache.can_take_over(1, 39) and cache.can_take_over(1, 40)
    cache.take_over(3, 20)
    assert cache.borrowed[3] == (1, 20)
    # the lender last: the victim is a free slot without an entry, then an entry that lends nothing
    cache.keep(5, np.arange(7))
    assert cache.victim([1, 5]) == 5 and cache.victim([1, 0]) == 0 and cache.victim([1, 5], spare=5) == 1
    cache.last_used[5] = -1
    assert cache.victim([5, 1]) == 5
    # moving slots moves their borrows and the slots lent from
    cache.swap(1, 0)
    assert cache.borrowers(0) == [(2, 40), (3, 20), (4, 30)] and 1 not in cache.entries and 0 in cache.entries
    rows = cache.rows([4, 5, 2])
    assert rows.slots.tolist() == [4, 5, 2] and rows.prefix_slots.tolist() == [0, 0, 0]
    assert rows.prefix_lens.tolist() == [30, 0, 40]
    cache.release(2)
    cache.drop(5)
    assert 2 not in cache.borrowed and 5 not in cache.entries

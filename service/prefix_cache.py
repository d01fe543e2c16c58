"""Automatic prefix caching, at slot granularity: which tokens each cache slot holds, and where a new prompt's
longest already-computed prefix lies.

A finished sequence's slot keeps its keys and values as an entry (its tokens and a last-used time) until the
slot is given to another sequence; free slots without an entry go first, then the least recently used entry.
A new prompt is matched token by token against every entry and every running sequence (the positions they
have written): the longest common prefix wins. Matching exact tokens rather than hashed blocks (vLLM hashes
blocks of 16 tokens because its cache is paged) reuses a prefix that ends inside a block too, and with at most
`max_num_seqs` slots to compare it costs microseconds. At least two prompt tokens are always computed: the
last one's logits are the ones sampled, and onnxruntime's CPU matrix products give every row of a product of
two or more rows the same bits however many rows there are, but a one-row product (a GEMV) rounds differently.
So a reused prompt prefix gives the same logits to the last bit as computing it again; positions a running
sequence wrote while decoding (a chat's previous answer) came from one-row products and may differ from a
recomputation in the last bits (the tokens chosen are the same unless two candidates tie to within them).

A prompt is looked up when it is admitted, and again before each step until it computes a chunk of its own (the
scheduler's second look, entries included): prompts that arrive together with the same system prompt wait for the
first of them to write it, then reuse it (on the CPU a prompt with more than `--prefill-chunk` tokens left waits
while another such prompt computes; the token budget rarely lets two long fresh prompts into one step anyway).

Shared prefixes. Where the graph reads a prefix from another cache row (the project's CausalAttention: the engine's
`shares_prefixes`), a prefix found in a slot that cannot be taken over (a running sequence's, or an entry whose
positions others borrow beyond the new prompt's match) is not copied but borrowed: the new slot reads positions
[0, n) from the lending slot's row for as long as it holds them (`borrowed[slot] = (lender, n)`), and only what lies
past the lender's own borrow is copied. So sixteen chats with one 1,000-token system prompt keep it once, and a
decode step reads it once for all of them (ortkernels/attention.c), not once per row. Borrows never chain: a slot
borrowing from a borrower borrows from its lender. A lending slot keeps its positions as they are: it is taken
over only by a prompt that matches at least every borrowed position, it is evicted last, and when it is evicted (or
its sequence fails) its borrowers get their own copies first (`give_back`). A prompt's chunk reads a borrowed prefix
key by key in one pass, the same sums as from a copy (its logits the same to the last bit); a decode step merges the
shared part's softmax with the row's own, so its logits may differ from a copy's in the last bits (as a one-row step's
already differ from a batch's).
"""

from __future__ import annotations

import time

import numpy as np

from service.kv_cache import CacheRows

MIN_MATCH = 8  # shorter matches are recomputed: a copy of a few positions is not worth a move
RECOMPUTED = 2  # prompt tokens always computed (see above)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens the token arrays a and b begin with alike."""
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    return n if same.all() else int(np.argmin(same))


class PrefixCache:
    def __init__(self, slots: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.entries: dict[int, np.ndarray] = {}  # free slot -> token ids behind its valid positions
        self.borrowed: dict[int, tuple[int, int]] = {}  # slot -> (lender slot, n): its positions [0, n) are there
        self.last_used = np.zeros(slots)
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens found already computed (prefix_cache_hits)

    def keep(self, slot: int, tokens: np.ndarray) -> None:
        """A sequence left `slot` with the keys and values of `tokens` (N,) at positions [0, N)."""
        if self.enabled and len(tokens):
            self.entries[slot] = tokens
            self.last_used[slot] = time.monotonic()

    def drop(self, slot: int) -> None:
        """The slot's contents are given up: its entry and its borrow (a lending slot's borrowers are given their
        own copies first: `give_back`)."""
        assert not self.borrowers(slot), "a lending slot gives back its positions before it is dropped"
        self.entries.pop(slot, None)
        self.borrowed.pop(slot, None)

    def swap(self, a: int, b: int) -> None:
        """The contents of slots a and b were exchanged."""
        ea, eb = self.entries.pop(a, None), self.entries.pop(b, None)
        if ea is not None:
            self.entries[b] = ea
        if eb is not None:
            self.entries[a] = eb
        self.last_used[[a, b]] = self.last_used[[b, a]]
        moved = {a: b, b: a}
        self.borrowed = {
            moved.get(slot, slot): (moved.get(lender, lender), n) for slot, (lender, n) in self.borrowed.items()
        }

    # ------------------------------------------------------------------ shared prefixes

    def borrowers(self, lender: int) -> list[tuple[int, int]]:
        """(slot, n) of each slot reading positions [0, n) from `lender`'s row."""
        return [(slot, n) for slot, (held, n) in self.borrowed.items() if held == lender]

    def shared_positions(self) -> int:
        """Positions that slots (running sequences and entries) read from another slot's row: what sharing saves.
        (Read from other threads at scrape time: a copy of the values, taken at once.)"""
        return sum(n for _, n in list(self.borrowed.values()))

    def can_take_over(self, slot: int, n: int) -> bool:
        """Whether a prompt matching the first n positions of entry `slot` may take the slot over: every position
        lent from it is among those it keeps."""
        return all(m <= n for _, m in self.borrowers(slot))

    def take_over(self, slot: int, n: int) -> None:
        """A prompt matching n positions of entry `slot` takes it over: the entry goes, a borrow of the slot's
        is cut to n."""
        self.entries.pop(slot, None)
        if slot in self.borrowed:
            lender, m = self.borrowed[slot]
            self.borrowed[slot] = (lender, min(m, n))

    def borrow(self, slot: int, source: int, n: int) -> int:
        """`slot` reads positions [0, n) that `source` holds from the slot that holds them (source's own lender,
        where source borrows them in turn). -> how many it borrows; the rest, [that, n), is source's own, to copy."""
        lender, m = self.borrowed.get(source, (source, n))
        shared = min(m, n)
        if shared > 0:
            self.borrowed[slot] = (lender, shared)
        return shared

    def release(self, slot: int) -> None:
        """`slot` borrows nothing any more (it was given its own copy, or its contents are given up)."""
        self.borrowed.pop(slot, None)

    def rows(self, slots: list[int]) -> CacheRows:
        """The engine's cache rows for a call over `slots`: each one's lender and borrowed length (0: none)."""
        lent = np.array([self.borrowed.get(slot, (0, 0)) for slot in slots], np.int32).reshape(-1, 2)  # (B, 2)
        return CacheRows(np.array(slots, np.int32), lent[:, 0].copy(), lent[:, 1].copy())  # (B,) each

    def lookup(
        self, prompt: np.ndarray, running: dict[int, np.ndarray], again: bool = False, beyond: int = 0
    ) -> tuple[int | None, int]:
        """(slot, n): the slot holding the longest prefix of prompt (P,) among the entries and the running
        sequences' written tokens (`running`: slot -> tokens), and its length n <= P - 2; (None, 0) if none
        reaches MIN_MATCH or passes `beyond` (the positions the prompt's slot holds already). Counts the query
        (once: not `again`, a second look before the prompt's first computed chunk) and the hit's new tokens.
        Entries are looked at first, so a tie goes to an entry (at admission its slot is taken over, no copy)."""
        if not self.enabled:
            return None, 0
        best, best_n = None, beyond
        limit = len(prompt) - RECOMPUTED
        for slot, tokens in [*self.entries.items(), *running.items()]:
            n = min(len(tokens), limit)
            if n <= best_n or tokens[0] != prompt[0]:
                continue
            n = common_prefix(tokens[:n], prompt)
            if n > best_n:  # entries come first, so a tie goes to an entry: no copy needed
                best, best_n = slot, n
        self.queries += 0 if again else len(prompt)
        if best is None or best_n < MIN_MATCH:
            return None, 0
        self.hits += best_n - beyond
        if best in self.entries:
            self.last_used[best] = time.monotonic()
        return best, best_n

    def victim(self, free: list[int], spare: int | None = None) -> int:
        """The free slot to give away: one without an entry, else the least recently used entry that lends no
        positions, else the least recently used one; `spare` (a slot about to be read) only when it is the last."""
        others = [s for s in free if s != spare] or free
        empty = [s for s in others if s not in self.entries]
        if empty:
            return min(empty)
        lenders = {lender for lender, _ in self.borrowed.values()}
        return min(others, key=lambda s: (s in lenders, self.last_used[s]))

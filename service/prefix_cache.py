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
first of them to write it, then copy it (on the CPU a prompt with more than `--prefill-chunk` tokens left waits
while another such prompt computes; the token budget rarely lets two long fresh prompts into one step anyway).
"""

from __future__ import annotations

import time

import numpy as np

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
        self.last_used = np.zeros(slots)
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens found already computed (prefix_cache_hits)

    def keep(self, slot: int, tokens: np.ndarray) -> None:
        """A sequence left `slot` with the keys and values of `tokens` (N,) at positions [0, N)."""
        if self.enabled and len(tokens):
            self.entries[slot] = tokens
            self.last_used[slot] = time.monotonic()

    def drop(self, slot: int) -> None:
        self.entries.pop(slot, None)

    def swap(self, a: int, b: int) -> None:
        """The contents of slots a and b were exchanged."""
        ea, eb = self.entries.pop(a, None), self.entries.pop(b, None)
        if ea is not None:
            self.entries[b] = ea
        if eb is not None:
            self.entries[a] = eb
        self.last_used[[a, b]] = self.last_used[[b, a]]

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

    def victim(self, free: list[int]) -> int:
        """The free slot to give away: one without an entry, else the least recently used entry."""
        empty = [s for s in free if s not in self.entries]
        if empty:
            return min(empty)
        return min(free, key=lambda s: self.last_used[s])

"""Per-token cost of incremental detokenization: the service's `IncrementalDetokenizer` (tokenizers' DecodeStream
underneath) against decoding a sliding window of ids each step (what it did before), on text and on random ids.

    python -m loadtests.detokenizer_speed --bundle bundles/smollm2-135m
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from service.tokenizer import DetokenizedDelta, IncrementalDetokenizer, TextTokenizer

TEXT = "café naïve — 日本語のテキストと中文的句子。 emoji: 🎉🚀👍🏽 def add(a, b): return a + b\n" * 60


class WindowDetokenizer(IncrementalDetokenizer):
    """The previous algorithm: decode the ids since the last emitted boundary twice per token."""

    def add(self, token_id: int) -> DetokenizedDelta:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()


def run(cls: type[IncrementalDetokenizer]):
    def go(tok: TextTokenizer, ids: list[int]) -> str:
        detok = cls(tok, ["never appears"])  # a stop string, so the hold-back check runs as in a real request
        return "".join(detok.add(t).text for t in ids) + detok.flush()

    return go


def per_token_us(fn, tok: TextTokenizer, ids: list[int], repeat: int = 5) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(tok, ids)
        best = min(best, time.perf_counter() - t)
    return best / len(ids) * 1e6, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    args = parser.parse_args()
    tok = TextTokenizer(args.bundle / "tokenizer.json", None, None, None)
    rng = np.random.default_rng(0)
    for name, ids in [
        ("text", tok.encode(TEXT)),
        ("random ids", [int(i) for i in rng.integers(0, tok.vocab_size, 3000)]),
    ]:
        old, a = per_token_us(run(WindowDetokenizer), tok, ids)
        new, b = per_token_us(run(IncrementalDetokenizer), tok, ids)
        same = a == b == tok.decode(ids)
        print(
            f"{name:10s} {len(ids)} tokens: window decode {old:.1f} us/token, DecodeStream {new:.1f} us/token ({same=})"
        )


if __name__ == "__main__":
    main()

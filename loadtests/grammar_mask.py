"""What structured output costs per token: the allowed-token mask of a JSON-schema grammar at batch 1 and 16.

    python -m loadtests.grammar_mask --bundle bundles/smollm2-135m [--steps 60]

For each library installed (llguidance, which the service uses; outlines-core when present), B sequences walk
the grammar together, each step choosing a random allowed token, as a sampler at high temperature would. Reported:
the schema's compile time and the median / p90 time per engine step to compute all B masks (plus advancing
each matcher), i.e. what a step of B constrained sequences adds to the engine step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "author": {
            "type": "object",
            "properties": {"first": {"type": "string", "maxLength": 16}, "last": {"type": "string", "maxLength": 16}},
            "required": ["first", "last"],
        },
        "tags": {"type": "array", "items": {"enum": ["poem", "story", "essay"]}, "maxItems": 3},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "published": {"type": "boolean"},
    },
    "required": ["author", "tags", "year", "published"],
    "additionalProperties": False,
}


def bench_llguidance(bundle: Path, batch: int, steps: int, rng: np.random.Generator) -> dict[str, float]:
    from service.grammar import Grammars

    manifest = json.loads((bundle / "manifest.json").read_text())
    eos = manifest["tokenizer"].get("eos_token_id")
    grammars = Grammars(bundle / "tokenizer.json", (eos,), manifest["model"]["vocab_size"])
    grammars.tokenizer  # noqa: B018 - built once per process, not per request
    t = time.perf_counter()
    grammar = grammars.compile(SCHEMA)
    compile_s = time.perf_counter() - t
    vocab = manifest["model"]["vocab_size"]
    seqs = [grammars.matcher(grammar) for _ in range(batch)]
    done = [False] * batch
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        for i, m in enumerate(seqs):
            if done[i]:
                continue
            allowed = np.flatnonzero(m.allowed(vocab))
            done[i] = m.advance(int(rng.choice(allowed)))
        times.append(time.perf_counter() - t)
        if all(done):
            break
    return {"compile_ms": compile_s * 1e3, **_summary(times)}


def bench_outlines_core(bundle: Path, batch: int, steps: int, rng: np.random.Generator) -> dict[str, float]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    tj = json.loads((bundle / "tokenizer.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    eos = manifest["tokenizer"]["eos_token_id"]
    byte_of = _gpt2_unicode_to_byte()
    tokens: dict[bytes, list[int]] = {}
    special = {t["content"] for t in tj.get("added_tokens", [])}
    for tok, i in tj["model"]["vocab"].items():
        if i == eos or tok in special:
            continue
        tokens.setdefault(bytes(byte_of[c] for c in tok), []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, tokens)
    t = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compile_s = time.perf_counter() - t
    vocab = manifest["model"]["vocab_size"]
    guides = [outlines_core.Guide(index) for _ in range(batch)]
    done = [False] * batch
    mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        for i, g in enumerate(guides):
            if done[i]:
                continue
            g.write_mask_into(mask.ctypes.data, mask.size, 4)
            bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
            allowed = np.flatnonzero(bits)
            token = int(rng.choice(allowed))
            if token == eos:
                done[i] = True
                continue
            g.advance(token)
            done[i] = g.is_finished()
        times.append(time.perf_counter() - t)
        if all(done):
            break
    return {"compile_ms": compile_s * 1e3, **_summary(times)}


def _gpt2_unicode_to_byte() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _summary(times: list[float]) -> dict[str, float]:
    ms = sorted(x * 1e3 for x in times)
    return {"steps": len(ms), "median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    benches = {"llguidance": bench_llguidance}
    try:
        import outlines_core  # noqa: F401

        benches["outlines-core"] = bench_outlines_core
    except ImportError:
        pass
    for name, bench in benches.items():
        for batch in (1, 16):
            result = bench(args.bundle, batch, args.steps, np.random.default_rng(0))
            per_seq = result["median_ms"] / batch
            print(f"{name:14s} batch {batch:2d}: {json.dumps(result)}  ({per_seq:.3f} ms per sequence-token)")


if __name__ == "__main__":
    main()

"""The engine's reduced logits (sampler.Candidates) against the full logits, on one device: equal values, equal tokens,
and the time of a decode step sampled each way.

    python -m loadtests.reduced_logits --bundle bundles/smollm2-135m-fp16 --device cuda

Prefills 16 cache rows with random prompts, then (1) reduces one 16-row decode step's logits and compares them with
the copied logits (the 128 largest exactly, the gathered ones exactly, log-sum-exp and mass within float rounding),
(2) samples `--seeds` times from both for 8 kinds of parameters and counts different tokens, (3) generates 16
sequences through the Scheduler with and without the reduction and counts equal texts, (4) times forward + sample at
1 and 16 rows for greedy, top-k 50 with a frequency penalty, and the model's defaults (t 0.2, top-p 0.9), the two
ways alternating. On the CPU the reduction is forced on (it is a CUDA feature in the service). One JSON line per part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

KINDS = [  # (params without max_tokens, counted output, banned eos)
    ({"temperature": 0.0}, False, False),
    ({"temperature": 0.0, "frequency_penalty": 1.0}, True, True),
    ({"temperature": 0.2, "top_p": 0.9}, False, False),
    ({"temperature": 0.7, "top_p": 0.9}, False, True),
    ({"temperature": 0.8, "top_p": 0.95, "top_k": 50, "frequency_penalty": 0.3}, True, True),
    ({"temperature": 1.0, "min_p": 0.05}, False, False),
    ({"temperature": 0.7, "repetition_penalty": 1.3, "logit_bias": ((7, 5.0),), "top_p": 0.8}, True, True),
    ({"temperature": 0.5}, False, False),
]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.reduced_logits")
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m-fp16"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--tokens", type=int, default=32, help="per sequence in part (3)")
    args = p.parse_args()

    from service.bundle import load_bundle
    from service.engine import Engine
    from service.sampler import Row, SamplingParams, logprobs_batch, reduction_inputs, sample_batch
    from service.scheduler import GenerationRequest, Scheduler
    from service.tokenizer import TextTokenizer

    bundle = load_bundle(args.bundle, verify_checksums=False)
    V, eos = bundle.vocab_size, tuple(sorted(bundle.eos_token_ids))
    engine = Engine(bundle, 16, 256, args.device, reduce_logits=True)
    rng = np.random.default_rng(0)
    prompts = rng.integers(min(100, V // 2), min(20000, V), (16, 32))  # (16, 32)
    for r in range(16):
        engine.forward(prompts[r : r + 1], np.arange(32)[None], np.array([31], np.int32), r, r + 1, np.array([31]))
    counts = {int(t): 1 for t in prompts[0, :10]}
    tokens = rng.integers(min(100, V // 2), min(20000, V), (16, 1))  # (16, 1)
    n = np.full(16, 32)

    def rows(kinds: list, seed: int, D: int = 16) -> list:
        out = []
        for i in range(D):
            params, counted, banned = kinds[i % len(kinds)]
            sp = SamplingParams(max_tokens=1, **params)
            out.append(Row(sp, np.random.default_rng([seed, i]), counts if counted else {}, prompts[i], eos * banned))
        return out

    def step(rs: list, reduce: bool):  # noqa: ANN202
        D = len(rs)
        red = reduction_inputs(rs) if reduce else None
        return engine.forward(tokens[:D], n[:D, None], n[:D].astype(np.int32), 0, D, np.arange(D), red)

    c = step(rows(KINDS, 0), True)
    full = c.full().copy()  # (16, V)
    x = full.astype(np.float64)
    inv_t = reduction_inputs(rows(KINDS, 0))[0]
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    mass = np.exp((x - x.max(1, keepdims=True)) * inv_t[:, None]).sum(1)
    edits = np.take_along_axis(full, np.maximum(reduction_inputs(rows(KINDS, 0))[1], 0), 1)
    print(
        json.dumps(
            {
                "part": "values",
                "top_equal": bool(np.array_equal(c.values, -np.sort(-full, axis=1)[:, : c.values.shape[1]])),
                "ids_consistent": bool(np.array_equal(np.take_along_axis(full, c.ids, 1), c.values)),
                "edit_values_equal": bool(np.array_equal(edits, c.edit_values)),
                "lse_max_abs_err": float(np.abs(lse - c.lse).max()),
                "mass_max_rel_err": float((np.abs(mass - c.mass) / mass).max()),
            }
        ),
        flush=True,
    )

    different = 0
    for seed in range(args.seeds):
        c = step(rows(KINDS, seed), True)
        full = c.full().copy()
        a, b = sample_batch(c, rows(KINDS, seed)), sample_batch(full, rows(KINDS, seed))
        different += int((a != b).sum())
        la, lb = logprobs_batch(c, b, 5), logprobs_batch(full, b, 5)
        assert np.allclose(la[0], lb[0], atol=1e-3) and np.allclose(la[2], lb[2], atol=1e-3)
    print(json.dumps({"part": "tokens", "rows": 16 * args.seeds, "different": different}), flush=True)

    tokenizer = TextTokenizer.from_bundle(bundle)
    texts = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3,"]
    sk = [
        SamplingParams(max_tokens=args.tokens, temperature=0.0),
        SamplingParams(max_tokens=args.tokens, temperature=0.2, top_p=0.9, seed=3, logprobs=2),
        SamplingParams(max_tokens=args.tokens, temperature=0.8, top_p=0.95, top_k=50, frequency_penalty=0.3, seed=5),
        SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=6, min_tokens=10),
    ]

    def generate(reduce: bool) -> dict:
        s = Scheduler(Engine(bundle, 16, 256, args.device, reduce_logits=reduce), tokenizer, eos, 256, 512, 64, 1 << 20)
        s._thread = threading.current_thread()  # this thread runs the steps
        out: dict = {}
        for i, sp in enumerate(sk):
            for j, text in enumerate(texts):
                out[i, j] = []
                s.submit(GenerationRequest(f"r{i}{j}", tuple(tokenizer.encode(text)), sp), out[i, j].append)
        while s.running or s.waiting or not s._incoming.empty():
            s.step()
        return {k: "".join(e.text for e in v) for k, v in out.items()}

    reduced, plain = generate(True), generate(False)
    equal = sum(reduced[k] == plain[k] for k in reduced)
    print(json.dumps({"part": "scheduler", "sequences": len(reduced), "equal_texts": equal}))

    def ms(f) -> float:  # noqa: ANN001
        for _ in range(3):
            f()
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return round(statistics.median(ts) * 1e3, 3)

    for name, kind in (("greedy", KINDS[0]), ("top-k 50 + penalty", KINDS[4]), ("t 0.2, top-p 0.9", KINDS[2])):
        for D in (1, 16):
            times: dict = {"full": [], "reduced": []}
            for _ in range(2):
                for way in ("full", "reduced"):
                    rs = rows([kind], 0, D)
                    times[way].append(ms(lambda rs=rs, way=way: sample_batch(step(rs, way == "reduced"), rs)))
            print(json.dumps({"part": "step", "case": name, "rows": D, **{f"{k}_ms": v for k, v in times.items()}}))


if __name__ == "__main__":
    main()

"""Scheduler-level step profile: where a step's time goes with the real scheduler, no HTTP.

    python -m loadtests.scheduler_profile --bundle bundles/smollm2-135m

Drives service.scheduler.Scheduler step by step on this thread (its loop is not started) and reports, per case,
the median decode-only step (every stream past its prompt): its wall time, the time inside
`session.run_with_iobinding` ("graph") and the rest ("host": binding, logits to numpy, sampling, detokenizing,
emitting; with --reduce-logits also the reduction of the logits to Candidates, "reduce", part of "host"). Cases:
  batch 1 / batch 16, greedy and sampled (temperature 0.8, top-p 0.95, top-k 50, frequency penalty 0.3, seeded)
  batch 4 and 16 with the model's recommended sampling (the bundle's generation defaults, what a request that names no
  temperature or top_p gets: SmolLM2's temperature 0.2, top-p 0.9), seeded
  batch 16 at temperature 1.0 with top-p 0.95, and at temperature 1.0 alone (wide distributions: the whole
  vocabulary in play), seeded
  two streams in slots 0 and 1, and two streams left in slots 0 and 15 after 14 short ones between them ended
Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

PROMPT, OUTPUT = 128, 128


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.scheduler_profile")
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reduce-logits", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    args = p.parse_args()

    from loadtests.step_profile import time_graph
    from service.bundle import BundleError, load_bundle
    from service.engine import Engine
    from service.sampler import SamplingParams
    from service.scheduler import GenerationRequest, Scheduler
    from service.tokenizer import TextTokenizer

    try:
        bundle = load_bundle(args.bundle, verify_checksums=False)
        engine = Engine(
            bundle,
            slots=16,
            max_len=PROMPT + OUTPUT + 8,
            device=args.device,
            threads=args.threads,
            cuda_graphs=args.cuda_graphs,
            reduce_logits=args.reduce_logits,
        )
    except BundleError as exc:  # no such bundle, or no usable GPU for --device cuda: one line
        raise SystemExit(f"scheduler_profile: {exc}") from None
    tokenizer = TextTokenizer.from_bundle(bundle)
    graph_s = time_graph(engine.session)
    V = bundle.vocab_size
    reduce_s = time_graph(engine.reducer.session) if engine.reducer is not None else [0.0]
    rng = np.random.default_rng(0)
    greedy = SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(
        max_tokens=OUTPUT, temperature=0.8, top_p=0.95, top_k=50, frequency_penalty=0.3, seed=1, ignore_eos=True
    )

    g = bundle.generation_defaults
    defaults = SamplingParams(
        max_tokens=OUTPUT,
        temperature=g.get("temperature", 1.0),
        top_p=g.get("top_p", 1.0),
        top_k=int(g.get("top_k", 0)),
        seed=1,
        ignore_eos=True,
    )

    def case(name: str, params: list[SamplingParams], rows: int) -> None:
        """Runs the requests to the end; the median over decode-only steps with `rows` streams decoding."""
        s = Scheduler(engine, tokenizer, bundle.eos_token_ids, PROMPT + OUTPUT + 8, 2048, prefix_cache=False)
        s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
        for i, sp in enumerate(params):
            ids = tuple(int(t) for t in rng.integers(min(300, V // 2), min(20000, V), PROMPT))  # (a tiny model too)
            s.submit(GenerationRequest(f"r{i}", ids, sp), lambda event: None)
        s.step()  # admits everything
        counted = []
        while s.running:
            decode_only = all(q.decoding for q in s.running.values())
            n = len(s.running)
            graph_s[0] = reduce_s[0] = 0.0
            t = time.perf_counter()
            s.step()
            wall = time.perf_counter() - t
            if decode_only and n == rows:
                counted.append((wall, graph_s[0], reduce_s[0]))
        step = statistics.median(w for w, _, _ in counted)
        graph = statistics.median(g for _, g, _ in counted)
        reduce = statistics.median(r for _, _, r in counted)
        out = {
            "case": name,
            "rows": rows,
            "steps": len(counted),
            "step_ms": round(step * 1e3, 2),
            "graph_ms": round(graph * 1e3, 2),
            "host_ms": round((step - graph) * 1e3, 2),
            "reduce_ms": round(reduce * 1e3, 2),  # of host_ms: the logits' reduction (--reduce-logits)
            "host_share": round((step - graph) / step, 3),
        }
        print(json.dumps(out), flush=True)

    wide = SamplingParams(max_tokens=OUTPUT, temperature=1.0, top_p=0.95, seed=1, ignore_eos=True)
    plain = SamplingParams(max_tokens=OUTPUT, temperature=1.0, seed=1, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    case("batch 1 greedy", [greedy], 1)
    case("batch 1 sampled", [sampled], 1)
    case("batch 16 greedy", [greedy] * 16, 16)
    case("batch 16 sampled", [sampled] * 16, 16)
    case("batch 4, the model's defaults", [defaults] * 4, 4)
    case("batch 16, the model's defaults", [defaults] * 16, 16)
    case("batch 16, temperature 1.0, top-p 0.95", [wide] * 16, 16)
    case("batch 16, temperature 1.0", [plain] * 16, 16)
    case("2 streams, slots 0 and 1", [greedy] * 2, 2)
    case("2 streams, slots 0 and 15 (the 14 between ended)", [greedy] + [short] * 14 + [greedy], 2)


if __name__ == "__main__":
    main()

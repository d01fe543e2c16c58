"""W4 in-process, with the real scheduler and no HTTP: a shared prompt prefix read where it is against copied.

    python -m loadtests.shared_prefix --bundle bundles/smollm2-135m --rounds 2
    (--users, --turns, --system-tokens, --turn-tokens, --output-tokens: W4's 16, 4, 1000, 32, 64 unless given)
    python -m loadtests.shared_prefix --continue-call-tokens 64,128 --rounds 3

W4's chat service (loadtests/workloads.py: 16 users, each sending 4 requests one after another, every one the same
1,000-token system prompt plus a 32-token turn of its own, 64 tokens answered greedily) driven step by step on this
thread through service.scheduler.Scheduler with the prefix cache on, in two engines over one bundle, alternating
round by round: `share`, the engine reading shared prefixes where they are (the graph's cache_rows / prefix_rows /
prefix_lens), and `copy`, the same graph bound row range by row range, each prefix copied into the slot that reuses
it and decoded from there (as the service did before; continuing prompts then run one a call, and slots are moved to
keep a call's rows contiguous). A user's next request is submitted right after the step that ended the previous one.
Prints one JSON line per round and mode: TTFT p50 over all requests and over the later turns, the median step with
three quarters of the users or more decoding (wall and inside `session.run_with_iobinding`), and the run's wall time.
`--continue-call-tokens A,B,...` runs `share` alone, once per value of the scheduler's CONTINUE_CALL_TOKENS (the most
padded tokens of one call of continuing prompts), alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from loadtests.workloads import (
    CHAT_OUTPUT_TOKENS,
    CHAT_ROUNDS,
    CHAT_SYSTEM_TOKENS,
    CHAT_TURN_TOKENS,
    CHAT_USERS,
    chat_prompt,
)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.shared_prefix")
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--users", type=int, default=CHAT_USERS)
    p.add_argument("--turns", type=int, default=CHAT_ROUNDS)
    p.add_argument("--system-tokens", type=int, default=CHAT_SYSTEM_TOKENS)
    p.add_argument("--turn-tokens", type=int, default=CHAT_TURN_TOKENS)
    p.add_argument("--output-tokens", type=int, default=CHAT_OUTPUT_TOKENS)
    p.add_argument("--continue-call-tokens", help="comma-separated values: share mode once per value, alternating")
    args = p.parse_args()

    from loadtests.step_profile import time_graph
    from service.bundle import load_bundle
    from service.engine import Engine
    from service.sampler import SamplingParams
    from service.scheduler import GenerationRequest, Scheduler
    from service.tokenizer import TextTokenizer

    bundle = load_bundle(args.bundle, verify_checksums=False)
    tokenizer = TextTokenizer.from_bundle(bundle)
    max_len = args.system_tokens + args.turn_tokens + args.output_tokens + 8
    modes = ("share",) if args.continue_call_tokens else ("share", "copy")
    engines = {
        mode: Engine(bundle, args.users, max_len, "cpu", args.threads, share_prefixes=mode == "share") for mode in modes
    }
    if not engines["share"].shares_prefixes:
        raise SystemExit(f"shared_prefix: {args.bundle}'s graph does not address cache rows (ortkernels/ not built)")
    timers = {mode: time_graph(e.session) for mode, e in engines.items()}
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)

    def run(mode: str) -> dict:
        s = Scheduler(engines[mode], tokenizer, bundle.eos_token_ids, max_len, 2048, prefix_cache=True)
        s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
        graph_s = timers[mode]
        sent: dict[tuple[int, int], float] = {}
        first: dict[tuple[int, int], float] = {}
        done: set[tuple[int, int]] = set()

        def submit(user: int, turn: int) -> None:
            key = (user, turn)

            def sink(event, key=key) -> None:  # noqa: ANN001
                first.setdefault(key, time.perf_counter())
                if event.finish_reason:
                    done.add(key)

            sent[key] = time.perf_counter()
            ids = tuple(chat_prompt(user, turn, args.system_tokens, args.turn_tokens))
            s.submit(GenerationRequest(f"{user}-{turn}", ids, params), sink)

        turn = dict.fromkeys(range(args.users), 0)
        for user in turn:
            submit(user, 0)
        steps = []  # (rows decoding, wall s, graph s)
        t0 = time.perf_counter()
        while len(done) < args.users * args.turns:
            decoding = sum(1 for q in s.running.values() if q.decoding)
            graph_s[0] = 0.0
            t = time.perf_counter()
            s.step()
            steps.append((decoding, time.perf_counter() - t, graph_s[0]))
            for user in turn:
                if (user, turn[user]) in done and turn[user] < args.turns - 1:
                    turn[user] += 1
                    submit(user, turn[user])
        ttft = {key: first[key] - sent[key] for key in sent}
        full = [(w, g) for rows, w, g in steps if rows >= 0.75 * args.users] or [(0.0, 0.0)]
        return {
            "mode": mode,
            "ttft_p50_ms": round(statistics.median(ttft.values()) * 1e3, 1),
            "ttft_p50_later_turns_ms": round(statistics.median(v for (_, t), v in ttft.items() if t) * 1e3, 1),
            "decode_step_ms": round(statistics.median(w for w, _ in full) * 1e3, 1),
            "decode_step_graph_ms": round(statistics.median(g for _, g in full) * 1e3, 1),
            "wall_s": round(time.perf_counter() - t0, 2),
        }

    import service.scheduler

    for r in range(args.rounds):
        if args.continue_call_tokens:
            for value in [int(v) for v in args.continue_call_tokens.split(",")]:
                service.scheduler.CONTINUE_CALL_TOKENS = value  # read by the scheduler at each step
                print(json.dumps({"round": r + 1, "continue_call_tokens": value, **run("share")}), flush=True)
            continue
        for mode in modes:
            print(json.dumps({"round": r + 1, **run(mode)}), flush=True)


if __name__ == "__main__":
    main()

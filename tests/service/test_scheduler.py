"""The scheduler against a small real bundle: batching must not change results; cancelled work frees its slot."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.bundle import load_bundle
from service.engine import Engine
from service.sampler import SamplingParams
from service.scheduler import CONTINUE_CALL_TOKENS, EngineStopped, GenerationRequest, Scheduler
from service.tokenizer import IncrementalDetokenizer, TextTokenizer
from tests.helpers import needs_kernels, wait_for


class Collector:
    def __init__(self, n: int = 1) -> None:
        self.events, self.done, self.started, self.n = [], threading.Event(), threading.Event(), n

    def __call__(self, event) -> None:
        self.events.append(event)
        self.started.set()
        if sum(1 for e in self.events if e.finish_reason) == self.n:
            self.done.set()

    def tokens(self, index: int = 0) -> list[int]:
        return [t for e in self.events if e.index == index for t in e.token_ids]

    def text(self, index: int = 0) -> str:
        return "".join(e.text for e in self.events if e.index == index)


@pytest.fixture()
def make_scheduler(tiny_bundle):
    made = []

    def make(slots=16, budget=256, max_len=256, prefix_cache=True, reduce_logits=None):
        bundle = load_bundle(tiny_bundle)
        engine = Engine(bundle, slots, max_len, reduce_logits=reduce_logits)
        tok = TextTokenizer(bundle.tokenizer_file, bundle.chat_template, None, None)
        s = Scheduler(engine, tok, bundle.eos_token_ids, max_len, budget, prefix_cache=prefix_cache)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def run(s, prompt, n=1, **params):
    c = Collector(n)
    s.submit(
        GenerationRequest("r", tuple(prompt), SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **params}), n), c
    )
    return c


def test_greedy_tokens_do_not_depend_on_the_rest_of_the_batch(make_scheduler):
    s = make_scheduler()
    prompt = list(range(100, 140))
    alone = run(s, prompt, ignore_eos=True)
    assert alone.done.wait(60)
    others = []
    for i in range(15):  # different lengths, arriving while the probe runs, finishing at different times
        others.append(run(s, list(range(200 + i, 200 + i + 5 + 7 * i)), max_tokens=5 + 3 * i, ignore_eos=True))
        if i == 7:
            probe = run(s, prompt, ignore_eos=True)
    assert probe.done.wait(60) and all(o.done.wait(60) for o in others)
    assert probe.tokens() == alone.tokens() and len(alone.tokens()) == 24


def test_chunked_prefill_gives_the_same_tokens(make_scheduler):
    prompt = list(range(300, 400))
    whole = run(make_scheduler(budget=256), prompt, ignore_eos=True)
    chunked = run(make_scheduler(budget=16), prompt, ignore_eos=True)
    assert whole.done.wait(60) and chunked.done.wait(60)
    assert whole.tokens() == chunked.tokens()


def test_seeded_sampling_reproduces_and_n_choices_differ(make_scheduler):
    s = make_scheduler()
    a = run(s, [5, 6, 7], n=3, temperature=1.0, seed=123)
    b = run(s, [5, 6, 7], n=3, temperature=1.0, seed=123)
    assert a.done.wait(60) and b.done.wait(60)
    assert [a.tokens(i) for i in range(3)] == [b.tokens(i) for i in range(3)]
    assert len({tuple(a.tokens(i)) for i in range(3)}) > 1
    c, d = (run(s, [5, 6, 7], temperature=1.0, seed=-123) for _ in range(2))  # OpenAI's seeds may be negative
    assert c.done.wait(60) and d.done.wait(60) and c.tokens() == d.tokens()


def test_an_engine_that_reduces_its_logits_gives_the_same_tokens_and_logprobs(make_scheduler):
    """Decode steps sampled from Candidates (as on CUDA) against the full logits: the same tokens and logprobs for
    greedy, seeded top-p, top-k with a penalty, min-p, banned eos and plain temperature rows, all in one batch."""
    kinds = [
        dict(temperature=0.0, logprobs=2),
        dict(temperature=0.2, top_p=0.9, seed=3, logprobs=3),
        dict(temperature=0.8, top_p=0.95, top_k=50, frequency_penalty=0.3, seed=5, ignore_eos=True),
        dict(temperature=1.0, min_p=0.1, presence_penalty=1.0, seed=7),
        dict(temperature=1.0, seed=6, min_tokens=10),
        dict(temperature=0.0, repetition_penalty=1.3, logit_bias=((11, 3.0),), ignore_eos=True),
    ]
    got = []
    for reduce_logits in (False, True):
        s = make_scheduler(reduce_logits=reduce_logits)
        runs = [run(s, [5 + i, 6, 7], **kind) for i, kind in enumerate(kinds)]
        assert all(c.done.wait(60) for c in runs)
        got.append([(c.tokens(), [lp.logprob for e in c.events for lp in e.logprobs or ()]) for c in runs])
    (plain, reduced) = got
    for (tokens, lps), (want_tokens, want_lps) in zip(reduced, plain):
        assert tokens == want_tokens
        np.testing.assert_allclose(lps, want_lps, atol=1e-4)


def test_cancel_frees_the_slot_within_a_step(make_scheduler):
    s = make_scheduler(slots=2)
    c = Collector()
    state = s.submit(
        GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)), c
    )
    assert c.started.wait(30) and s.num_running == 1
    steps = s.steps
    s.cancel(state)
    wait_for(lambda: s.num_running == 0, "the cancelled sequence to retire")
    # the step under way when cancel() came, then the one that retires it; with nothing else to run the loop
    # then idles, so this counts steps, not time
    assert s.num_running == 0 and s.steps - steps <= 2


def test_max_tokens_and_length_finish(make_scheduler):
    s = make_scheduler()
    c = run(s, [1, 2, 3], max_tokens=7, ignore_eos=True)
    assert c.done.wait(30)
    assert len(c.tokens()) == 7 and c.events[-1].finish_reason == "length"


def test_a_failing_step_fails_only_its_requests_and_the_loop_keeps_serving(make_scheduler):
    s = make_scheduler()
    real, calls = s.engine.forward, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    s.engine.forward = flaky
    failed = run(s, [1, 2, 3], max_tokens=20, ignore_eos=True)
    assert failed.done.wait(30)
    assert failed.events[-1].finish_reason == "error" and "injected fault" in failed.events[-1].error
    s.engine.forward = real
    ok = run(s, [1, 2, 3], max_tokens=5, ignore_eos=True)
    assert ok.done.wait(30) and ok.events[-1].finish_reason == "length" and len(ok.tokens()) == 5
    assert s.alive and s.num_running == 0


def test_a_step_failing_after_a_choice_ended_sends_one_final_event_per_choice(make_scheduler, monkeypatch):
    """Choice 0 ends (length) in the step where choice 1's detokenizer fails: 0 must not get an error after it."""
    s = make_scheduler()
    real, calls = IncrementalDetokenizer.add, {"n": 0}

    def add(self, token_id):
        calls["n"] += 1
        if calls["n"] == 6:  # third step, second choice (the first already took its last token)
            raise RuntimeError("injected fault")
        return real(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    c = run(s, [1, 2, 3], n=2, max_tokens=3, ignore_eos=True)
    assert c.done.wait(30)
    finals = {i: [e.finish_reason for e in c.events if e.index == i and e.finish_reason] for i in range(2)}
    assert finals == {0: ["length"], 1: ["error"]}
    assert s.num_running == 0


def test_one_sequences_failure_is_its_own(make_scheduler, monkeypatch):
    """A sequence whose detokenizer raises fails alone: the stream decoding in the same call goes on to its end."""
    s = make_scheduler()
    real = IncrementalDetokenizer.add

    def add(self, token_id):
        if "BOOM" in self.stop and len(self.ids) > 6:
            raise RuntimeError("injected fault")
        return real(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    ok = run(s, [1, 2, 3], max_tokens=30, ignore_eos=True)
    bad = run(s, [4, 5, 6], max_tokens=30, ignore_eos=True, stop=("BOOM",))
    assert bad.done.wait(30) and ok.done.wait(30)
    assert bad.events[-1].finish_reason == "error" and "injected fault" in bad.events[-1].error
    assert ok.events[-1].finish_reason == "length" and len(ok.tokens()) == 30
    assert s.alive and s.num_running == 0


def test_a_sequence_whose_grammar_fails_fails_alone(make_scheduler, monkeypatch):
    """The grammar's mask is asked for while the call's rows are gathered: raising there fails that sequence, not
    the stream beside it in the same decode call."""
    s = make_scheduler()
    real = Scheduler._row

    def row(self, seq, grammar=True):
        if "BOOM" in seq.params.stop and len(seq.output) > 3:
            raise RuntimeError("injected fault")
        return real(self, seq, grammar)

    monkeypatch.setattr(Scheduler, "_row", row)
    ok = run(s, [1, 2, 3], max_tokens=30, ignore_eos=True)
    bad = run(s, [4, 5, 6], max_tokens=30, ignore_eos=True, stop=("BOOM",))
    assert bad.done.wait(30) and ok.done.wait(30)
    assert bad.events[-1].finish_reason == "error" and "injected fault" in bad.events[-1].error
    assert ok.events[-1].finish_reason == "length" and len(ok.tokens()) == 30


def test_a_failing_prompt_call_fails_its_prompts_not_the_running_streams(make_scheduler):
    s = make_scheduler()
    real = s.engine.forward
    ok = run(s, [1, 2, 3], max_tokens=200, ignore_eos=True)
    assert ok.started.wait(30)

    def no_prompts(*args, **kwargs):
        if args[0].shape[1] > 1:  # (N, S) tokens: a prompt call
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    s.engine.forward = no_prompts
    bad = run(s, [4, 5, 6, 7], max_tokens=5)
    assert bad.done.wait(30)
    assert not ok.done.is_set()  # the two overlapped: the stream was running when the prompt's call failed
    assert ok.done.wait(30)
    assert bad.events[-1].finish_reason == "error" and "injected fault" in bad.events[-1].error
    assert ok.events[-1].finish_reason == "length" and len(ok.tokens()) == 200


def test_a_prompt_whose_admission_fails_is_answered(make_scheduler):
    """Taken off the waiting queue and not yet running when its prefix lookup raised: it still gets its final event
    (it waited for its request timeout before)."""
    s = make_scheduler()
    real, calls = s.prefix.lookup, {"n": 0}

    def lookup(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    s.prefix.lookup = lookup
    bad = run(s, [1, 2, 3], max_tokens=5)
    assert bad.done.wait(30) and bad.events[-1].finish_reason == "error" and "injected fault" in bad.events[-1].error
    ok = run(s, [1, 2, 3], max_tokens=5, ignore_eos=True)
    assert ok.done.wait(30) and ok.events[-1].finish_reason == "length"


def test_non_finite_logits_are_reported_not_sampled(make_scheduler):
    s = make_scheduler()
    real = s.engine.forward
    s.engine.forward = lambda *args, **kwargs: real(*args, **kwargs) * np.float32("nan")
    c = run(s, [1, 2, 3], max_tokens=5)
    assert c.done.wait(30)
    assert c.tokens() == [] and c.events[-1].finish_reason == "error" and "non-finite" in c.events[-1].error
    assert s.alive and s.num_running == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_loop_answers_everyone_and_refuses_new_work(make_scheduler):
    s = make_scheduler(slots=1)
    first = run(s, [1, 2, 3], max_tokens=200, ignore_eos=True)
    second = run(s, [4, 5, 6], max_tokens=5)  # waits for the only slot
    assert first.started.wait(30)

    def die() -> None:
        raise SystemExit("the loop itself breaks")

    s.step = die  # escapes the per-step handler
    assert first.done.wait(10) and second.done.wait(10)
    assert first.events[-1].finish_reason == second.events[-1].finish_reason == "error"
    wait_for(lambda: not s.alive, "the loop to stop")
    with pytest.raises(EngineStopped):
        run(s, [1], max_tokens=1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_request_queued_as_the_loop_dies_is_answered(make_scheduler, monkeypatch):
    """submit() saw the loop alive, the loop then died and took its last look at the queue: the request still gets
    its final event (it waited for its request timeout before)."""
    s = make_scheduler(slots=1)

    def die() -> None:
        raise SystemExit("the loop itself breaks")

    s.step = die
    run(s, [1, 2, 3], max_tokens=5)  # wakes the loop, which dies on it
    wait_for(lambda: not s.alive, "the loop to stop")
    monkeypatch.setattr(Scheduler, "alive", property(lambda self: True))  # the check passed just before the death
    late = run(s, [4, 5, 6], max_tokens=5)
    assert late.done.wait(10) and late.events[-1].finish_reason == "error"


def test_jobs_run_between_steps_one_per_step_and_count_as_waiting(make_scheduler):
    s = make_scheduler(slots=2)
    c = run(s, [1, 2, 3], max_tokens=40, ignore_eos=True)
    seen, done = [], threading.Event()

    def job():
        seen.append((s.steps, s.num_running))
        if len(seen) == 3:
            done.set()

    for _ in range(3):
        s.run_between_steps(job, 5)
    assert done.wait(30) and c.done.wait(30)
    assert len({step for step, _ in seen}) == 3  # never two jobs between the same two steps
    assert len(c.tokens()) == 40 and s.queued_tokens == 0


def test_jobs_are_refused_past_the_waiting_bounds(tiny_bundle):
    from service.scheduler import QueueFull

    bundle = load_bundle(tiny_bundle)
    engine = Engine(bundle, 1, 64)
    tok = TextTokenizer(bundle.tokenizer_file, bundle.chat_template, None, None)
    s = Scheduler(engine, tok, bundle.eos_token_ids, 64, 64, max_waiting=2, max_queued_tokens=100)
    with pytest.raises(EngineStopped):
        s.run_between_steps(lambda: None, 1)
    gate = threading.Event()
    s._thread = threading.Thread(target=gate.wait)  # an engine loop that is alive but runs nothing: jobs stay queued
    s._thread.start()
    try:
        s.run_between_steps(lambda: None, 60)
        with pytest.raises(QueueFull):
            s.run_between_steps(lambda: None, 60)  # 120 prompt tokens > 100
        s.run_between_steps(lambda: None, 10)
        with pytest.raises(QueueFull):
            s.run_between_steps(lambda: None, 1)  # 3 waiting > 2
        assert s.num_waiting == 2 and s.queued_tokens == 70
        assert not s.saturated()  # jobs take no slot: the engine's free slot still takes a request
    finally:
        gate.set()


def test_requests_bound_for_free_slots_do_not_count_against_the_waiting_bound(tiny_bundle):
    """Between a retirement and the next step's admission, the gate (max-num-seqs + max-waiting-requests in flight)
    and the scheduler agree: a request that will take a free slot is not refused as waiting."""
    from service.scheduler import QueueFull

    bundle = load_bundle(tiny_bundle)
    tok = TextTokenizer(bundle.tokenizer_file, bundle.chat_template, None, None)
    s = Scheduler(Engine(bundle, 2, 64), tok, bundle.eos_token_ids, 64, 64, max_waiting=2)
    gate = threading.Event()
    s._thread = threading.Thread(target=gate.wait)  # alive but admitting nothing: everything stays queued
    s._thread.start()
    request = GenerationRequest("r", (5, 6, 7), SamplingParams(max_tokens=4))
    try:
        for _ in range(4):  # 2 free slots + 2 waiting
            s.submit(request, lambda e: None)
        with pytest.raises(QueueFull):
            s.submit(request, lambda e: None)
    finally:
        gate.set()


def test_prompt_logprobs_read_every_position_and_match_one_full_prefill(make_scheduler, tiny_bundle):
    """Echo with logprobs asks the graph for every prompt position's logits (others get the last one only)."""
    from service.sampler import log_softmax

    prompt = list(range(500, 540))
    s = make_scheduler(budget=16)  # three chunks: positions continue across them
    c = Collector()
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1)
    s.submit(GenerationRequest("r", tuple(prompt), params, prompt_logprobs=True), c)
    assert c.done.wait(60)
    got = c.events[0].prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None

    engine = Engine(load_bundle(tiny_bundle), 1, 64)
    n = len(prompt)
    every = engine.forward(np.array([prompt]), np.arange(n)[None], np.array([n - 1], np.int32), 0, 1, np.arange(n))
    last = engine.forward(np.array([prompt]), np.arange(n)[None], np.array([n - 1], np.int32), 0, 1, np.array([n - 1]))
    np.testing.assert_allclose(last[0], every[-1], atol=1e-5)
    for i in range(1, n):
        want = log_softmax(every[i - 1])[prompt[i]]
        assert got[i].token_id == prompt[i] and abs(got[i].logprob - want) < 1e-4


def test_fresh_prompts_prefilled_together_give_the_tokens_each_gives_alone(make_scheduler):
    prompts = [list(range(50 + 3 * i, 50 + 3 * i + n)) for i, n in enumerate([7, 30, 18, 64, 3, 41])]
    alone = []
    for p in prompts:
        c = run(make_scheduler(slots=1, prefix_cache=False), p, ignore_eos=True, max_tokens=8)
        assert c.done.wait(60)
        alone.append(c.tokens())
    s = make_scheduler(slots=8, budget=512, prefix_cache=False)
    calls = []
    real = s.engine.forward
    s.engine.forward = lambda ids, *a: calls.append(ids.shape) or real(ids, *a)
    together = [run(s, p, ignore_eos=True, max_tokens=8) for p in prompts]  # queued before the loop wakes
    assert all(c.done.wait(60) for c in together)
    assert [c.tokens() for c in together] == alone
    assert any(rows > 1 and S > 1 for rows, S in calls), f"no batched prefill among {calls}"


def test_a_prompt_first_token_is_sent_before_the_next_prefill_call_of_the_step(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    s = Scheduler(Engine(bundle, 8, 256), TextTokenizer(bundle.tokenizer_file, None, None, None), (), 256, 1024)
    s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
    calls, seen = [], []
    real = s.engine.forward
    s.engine.forward = lambda ids, *a: calls.append(ids.shape) or real(ids, *a)
    assert s.prefill_call == 256  # on the CPU (PREFILL_CALL_TOKENS_CPU)
    for i in range(8):  # 8 x 100 tokens: more than one prefill call
        prompt = tuple(range(20 + i, 120 + i))
        s.submit(
            GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=4, temperature=0.0)),
            lambda e, i=i: seen.append((i, len(calls))),
        )
    s.step()
    assert [shape for shape in calls] == [(2, 100)] * 4
    assert sorted(seen) == [(i, 1 + i // 2) for i in range(8)], "first tokens waited for a later call"


@pytest.mark.parametrize(("budget", "joined"), [(1024, True), (150, False)])
def test_prompts_arriving_during_a_step_join_it_within_its_budget(tiny_bundle, budget, joined):
    """Two requests sent when the first one's first token comes out (as a burst's stragglers arrive while the
    engine prefills its first request) are prefilled in that same step if its token budget has room, in one call."""
    bundle = load_bundle(tiny_bundle)
    tok = TextTokenizer(bundle.tokenizer_file, None, None, None)
    s = Scheduler(Engine(bundle, 8, 256), tok, (), 256, budget)
    s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
    calls = []
    real = s.engine.forward
    s.engine.forward = lambda ids, *a: calls.append(ids.shape) or real(ids, *a)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    late = [Collector(), Collector()]

    def first(event) -> None:
        if len(calls) == 1:  # r0's first token: the others arrive now, while the step runs
            for i, c in enumerate(late):
                s.submit(GenerationRequest(f"r{i + 1}", tuple(range(30 + i, 130 + i)), params), c)

    s.submit(GenerationRequest("r0", tuple(range(20, 120)), params), first)
    s.step()
    assert calls == ([(1, 100), (2, 100)] if joined else [(1, 100)])
    assert all(c.started.is_set() for c in late) == joined
    while s.running or not s._incoming.empty():
        s.step()
    for i, c in enumerate(late):  # the same tokens as alone
        alone = Scheduler(Engine(bundle, 1, 256), tok, (), 256, budget)
        alone._thread = threading.current_thread()
        solo = Collector()
        alone.submit(GenerationRequest("solo", tuple(range(30 + i, 130 + i)), params), solo)
        while alone.running or not alone._incoming.empty():
            alone.step()
        assert c.tokens() == solo.tokens() and len(c.tokens()) == 4


def test_decode_computes_only_decoding_rows_after_middle_streams_end(make_scheduler):
    s = make_scheduler(slots=16, prefix_cache=False)
    probe = list(range(400, 420))
    solo = run(make_scheduler(slots=1, prefix_cache=False), probe, ignore_eos=True, max_tokens=40)
    assert solo.done.wait(60)
    calls = []  # (S, the slots each call computes): its (B,) rows wherever the graph addresses the cache, else [lo, hi)
    real = s.engine.forward

    def forward(ids, pos, seq, lo, hi, wanted, reduce, rows):
        calls.append((ids.shape[1], list(rows.slots) if rows is not None else list(range(lo, hi))))
        return real(ids, pos, seq, lo, hi, wanted, reduce, rows)

    s.engine.forward = forward
    streams = [
        run(s, probe if i in (0, 15) else [7 + i] * 5, ignore_eos=True, max_tokens=40 if i in (0, 15) else 3)
        for i in range(16)
    ]
    assert all(c.done.wait(60) for c in streams)
    assert streams[0].tokens() == solo.tokens() and streams[15].tokens() == solo.tokens()
    tail = [slots for S, slots in calls[-10:] if S == 1]
    # once the short ones end, each decode call computes the two probes' rows only (in [0, 2) where it binds one
    # contiguous range: the last moved beside the first), or one row when one of them ends a step before the other
    assert any(len(slots) == 2 for slots in tail), f"decode calls at the end: {tail}"
    assert all(len(slots) <= 2 for slots in tail), f"decode calls at the end: {tail}"
    if not s.engine.shares_prefixes:
        assert all(slots == [0, 1] for slots in tail if len(slots) == 2), f"decode calls at the end: {tail}"


def test_one_request_after_another_moves_no_cache_rows(make_scheduler):
    s = make_scheduler(slots=4)
    solo = make_scheduler(slots=1, prefix_cache=False)
    swaps = []
    real = s.cache.swap
    s.cache.swap = lambda a, b: swaps.append((a, b)) or real(a, b)
    for i in range(4):  # each new prompt is taken into a slot beside the cached entries of the ones before
        prompt = list(range(100 + 10 * i, 140 + 10 * i))
        got, want = run(s, prompt, ignore_eos=True), run(solo, prompt, ignore_eos=True)
        assert got.done.wait(60) and want.done.wait(60)
        assert got.tokens() == want.tokens()
    assert swaps == [], "a lone stream is computed in the slot it was given"


def test_swapping_slots_through_the_device_copy_graph_matches_numpy(tiny_bundle):
    from service.kv_cache import KVCache

    bundle = load_bundle(tiny_bundle)
    args = (bundle.n_layer, 3, bundle.n_kv_head, 32, bundle.head_dim, "float32", "cpu")
    plain, graph = KVCache(*args), KVCache(*args, device_copies=True)
    for cache in (plain, graph):
        assert cache.arrays is not None
        for a in cache.arrays:
            a[:] = np.random.default_rng(1).normal(size=a.shape)
        cache.lengths[:] = [32, 32, 32]
        cache.swap(0, 2)
        cache.copy(1, 0, 32)
    for a, b in zip(plain.arrays or [], graph.arrays or []):
        assert np.array_equal(a[:3], b[:3])


def test_long_prompts_prefill_in_capped_chunks_one_after_another(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    tok = TextTokenizer(bundle.tokenizer_file, None, None, None)
    prompts = {"a": tuple(range(20, 120)), "b": tuple(range(150, 250)), "c": tuple(range(300, 310))}  # 100, 100, 10

    def generate(chunk):
        s = Scheduler(Engine(bundle, 4, 256), tok, (), 256, 1024, prefix_cache=False, prefill_chunk=chunk)
        s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
        calls, got = [], {name: [] for name in prompts}
        real = s.engine.forward
        s.engine.forward = lambda ids, *a: calls.append((set(ids[:, 0].tolist()), ids.shape)) or real(ids, *a)
        for name, prompt in prompts.items():
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            s.submit(GenerationRequest(name, prompt, params), lambda e, name=name: got[name].extend(e.token_ids))
        while s.running or s.waiting or not s._incoming.empty():
            s.step()
        return calls, got

    whole_calls, whole = generate(256)
    calls, chunked = generate(32)
    assert chunked == whole and all(len(t) == 6 for t in whole.values())
    assert max(shape[1] for _, shape in calls) == 32 < max(shape[1] for _, shape in whole_calls) == 100
    prefills = [(firsts, shape[1]) for firsts, shape in calls if shape[1] > 1]  # (rows' first ids, chunk length)
    a, b, c = ([i for i, (firsts, _) in enumerate(prefills) if firsts & set(prompts[n])] for n in "abc")
    assert [prefills[i][1] for i in a] == [prefills[i][1] for i in b] == [32, 32, 32, 4]
    assert max(a) < min(b), f"the second long prompt started before the first was done: {prefills}"
    assert c == [0]  # a short prompt does not wait for the long one


@needs_kernels
def test_prompts_sharing_a_long_prefix_wait_and_borrow_it_from_the_leader(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    tok = TextTokenizer(bundle.tokenizer_file, None, None, None)
    system = tuple(range(30, 100))  # 70 tokens every prompt starts with: they end inside a's last chunk of 16
    tails = {name: tuple(range(start, start + 10)) for name, start in (("a", 100), ("b", 200), ("c", 300))}

    def generate(chunk):
        s = Scheduler(Engine(bundle, 4, 256), tok, (), 256, 1024, prefill_chunk=chunk)
        s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
        calls, got = [], {name: [] for name in tails}
        real = s.engine.forward
        s.engine.forward = lambda ids, *a: calls.append(ids[:, 0].tolist()) or real(ids, *a)
        for name, tail in tails.items():
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            s.submit(GenerationRequest(name, system + tail, params), lambda e, name=name: got[name].extend(e.token_ids))
        while s.running or s.waiting or not s._incoming.empty():
            s.step()
        return calls, got, s.prefix.hits

    _, whole, _ = generate(256)
    calls, chunked, hits = generate(16)
    assert chunked == whole and all(len(t) == 6 for t in whole.values())
    assert hits == 2 * 70  # b and c took the whole system prompt from a's slot, not computed beside it
    # ... borrowed, not copied (the graph reads a's row), and their turns continue together in one call
    assert Engine(bundle, 4, 256).shares_prefixes
    assert [firsts for firsts in calls if firsts[0] in (tails["b"][0], tails["c"][0])] == [[200, 300]]


def test_a_burst_of_chat_turns_gets_one_call_a_step_with_the_decode_calls_between(tiny_bundle):
    """Three turns after a cached system prompt arrive together: each gets its own call (20 tokens: two would pass
    CONTINUE_CALL_TOKENS), one a step, so the turns already answered decode between them; the answers are those
    computed without the prefix cache."""
    bundle = load_bundle(tiny_bundle)
    tok = TextTokenizer(bundle.tokenizer_file, None, None, None)
    system = tuple(range(30, 100))
    turns = {name: system + tuple(range(start, start + 20)) for name, start in (("b", 200), ("c", 300), ("d", 400))}

    def generate(prefix_cache: bool) -> tuple[list[tuple[int, int]], dict[str, list[int]]]:
        s = Scheduler(Engine(bundle, 4, 256), tok, (), 256, 1024, prefix_cache=prefix_cache)
        s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
        got: dict[str, list[int]] = {name: [] for name in ("a", *turns)}
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        s.submit(GenerationRequest("a", system + (101, 102), params), lambda e: got["a"].extend(e.token_ids))
        while s.running or s.waiting or not s._incoming.empty():
            s.step()  # a's system prompt stays cached in its slot
        calls = []
        real = s.engine.forward
        s.engine.forward = lambda ids, *a: calls.append(ids.shape) or real(ids, *a)
        for name, prompt in turns.items():
            s.submit(GenerationRequest(name, prompt, params), lambda e, name=name: got[name].extend(e.token_ids))
        while s.running or s.waiting or not s._incoming.empty():
            s.step()
        return calls, got

    _, plain = generate(False)
    calls, cached = generate(True)
    assert cached == plain and all(len(t) == 6 for t in plain.values())
    assert CONTINUE_CALL_TOKENS < 2 * 20
    turn_calls = [i for i, (rows, S) in enumerate(calls) if S > 1]
    assert [calls[i] for i in turn_calls] == [(1, 20)] * 3, calls  # the system prompt is not computed again
    assert [calls[i + 1] for i in turn_calls[:2]] == [(1, 1), (2, 1)], calls  # a decode call after each turn's


def test_no_prompt_is_left_one_token_for_a_chunk_of_its_own(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    tok = TextTokenizer(bundle.tokenizer_file, None, None, None)
    s = Scheduler(Engine(bundle, 2, 256), tok, (), 256, 1024, prefix_cache=False, prefill_chunk=16)
    s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
    calls = []
    real = s.engine.forward
    s.engine.forward = lambda ids, *a: calls.append(ids.shape) or real(ids, *a)
    for name, n in (("a", 33), ("b", 17)):  # 16 + 16 + 1 and 16 + 1 if cut plainly
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        s.submit(GenerationRequest(name, tuple(range(40, 40 + n)), params), lambda e: None)
    while s.running or s.waiting or not s._incoming.empty():
        s.step()
    prefills = [S for rows, S in calls if S > 1]
    assert sorted(prefills) == sorted([16, 15, 2, 15, 2]), calls  # a: 16 15 2, b: 15 2


@needs_kernels
def test_a_running_prefix_is_borrowed_and_given_back_when_its_slot_is_wanted(tiny_bundle):
    """Two slots: b borrows the system prompt a is decoding with (its row read from a's, nothing copied); a ends and
    its slot, still lending, is the only one c can have: b gets its own copy first. Every answer is the one computed
    without the prefix cache."""
    bundle = load_bundle(tiny_bundle)
    tok = TextTokenizer(bundle.tokenizer_file, None, None, None)
    system = tuple(range(30, 90))
    prompts = {"a": system + (101, 102), "b": system + (201, 202, 203), "c": tuple(range(500, 530))}
    lengths = {"a": 3, "b": 12, "c": 5}

    def scheduler(prefix_cache: bool) -> tuple[Scheduler, dict[str, list[int]]]:
        s = Scheduler(Engine(bundle, 2, 256), tok, (), 256, 1024, prefix_cache=prefix_cache)
        s._thread = threading.current_thread()  # this thread runs the steps: the scheduler counts as alive
        return s, {name: [] for name in prompts}

    def submit(s: Scheduler, got: dict[str, list[int]], name: str) -> None:
        params = SamplingParams(max_tokens=lengths[name], temperature=0.0, ignore_eos=True)
        s.submit(GenerationRequest(name, prompts[name], params), lambda e: got[name].extend(e.token_ids))

    def slot(s: Scheduler, name: str) -> int:
        return next(q.slot for q in s.running.values() if q.state.request.request_id == name)

    alone = {}
    for name in prompts:
        s, got = scheduler(False)
        submit(s, got, name)
        while s.running or not s._incoming.empty():
            s.step()
        alone[name] = got[name]

    s, got = scheduler(True)
    assert s.engine.shares_prefixes
    submit(s, got, "a")
    s.step()  # a's prompt
    submit(s, got, "b")
    s.step()  # b borrows a's 60 system positions and computes its own 3
    a, b = slot(s, "a"), slot(s, "b")
    assert s.prefix.borrowed == {b: (a, len(system))} and s.prefix.shared_positions() == len(system)
    while len(got["a"]) < lengths["a"]:
        s.step()
    s.step()  # a has ended: its slot an entry, still lent to b
    assert a in s.prefix.entries and s.prefix.borrowers(a) == [(b, len(system))] and len(got["b"]) < lengths["b"]
    submit(s, got, "c")
    s.step()  # c takes a's slot, the only free one: b reads its own copy from now on
    assert slot(s, "c") == a and s.prefix.borrowed == {}
    while s.running or not s._incoming.empty():
        s.step()
    assert got == alone

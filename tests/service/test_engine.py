"""The engine's call paths agree: a row range's binding reused across calls, and the graph paths (decode steps, and
continuing prompts' chunks right-padded to a bucket: fixed input buffers updated in place, cache rows bound once,
total_sequence_length at the cache length) that CUDA replays from captured graphs. On the CPU the same bindings run
without capture, so what they feed the graphs is checked here."""

from __future__ import annotations

import numpy as np
import pytest

from service.bundle import load_bundle
from service.cuda_graphs import ChunkGraphs, DecodeGraphs
from service.engine import Engine


def _prefill(engine: Engine, ids: np.ndarray) -> np.ndarray:
    B, S = ids.shape  # (B, S) prompts of one length, rows [0, B)
    wanted = np.arange(B) * S + S - 1
    return engine.forward(ids, np.tile(np.arange(S), (B, 1)), np.full(B, S - 1, np.int32), 0, B, wanted)


def test_reused_bindings_and_the_decode_graph_path_give_the_plain_calls_logits(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    plain, fast = Engine(bundle, 4, 64, "cpu"), Engine(bundle, 4, 64, "cpu")
    fast.graphs = graphs = DecodeGraphs(fast)  # as on CUDA: forward routes decode calls to it
    assert graphs.check() == 0.0
    replays = []
    run = graphs.run
    graphs.run = lambda *a: replays.append(len(a[2])) or run(*a)  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, bundle.vocab_size, (3, 5))  # (3, 5): three prompts prefilled together
    np.testing.assert_array_equal(_prefill(fast, ids), _prefill(plain, ids))
    lengths = np.array([5, 5, 5])
    held = []
    for D in [3, 3, 2, 3, 1]:  # batch sizes come and go; each keeps its own buffers
        tokens = rng.integers(3, bundle.vocab_size, (D, 1))  # (D, 1)
        n = lengths[:D]
        plain._bindings.clear()  # the reference binds everything afresh each call
        want = plain.forward(tokens, n[:, None], n.astype(np.int32), 0, D, np.arange(D))  # (D, V)
        got = fast.forward(tokens, n[:, None], n.astype(np.int32), 0, D, np.arange(D))
        assert got.shape == (D, bundle.vocab_size)
        np.testing.assert_array_equal(got, want)
        held.append((got, want.copy()))
        lengths[:D] += 1
    assert replays == [3, 3, 2, 3, 1]
    for got, want in held:  # a returned array is the caller's: later steps of the same batch size leave it alone
        np.testing.assert_array_equal(got, want)
    # the same rows again with other logits wanted (a row's last only, then all): the plain path, its binding reused
    tokens, n = rng.integers(3, bundle.vocab_size, (3, 1)), lengths[:3]
    for wanted in (np.array([2]), np.arange(3)):
        plain._bindings.clear()
        want = plain.forward(tokens, n[:, None], n.astype(np.int32), 0, 3, wanted)
        np.testing.assert_array_equal(fast.forward(tokens, n[:, None], n.astype(np.int32), 0, 3, wanted), want)
    assert replays[-1] == 3 and len(replays) == 6  # arange(3) took the graph path, [2] did not
    # rows [1, 3) (the plain path): its inputs are written into the arrays it bound at the first call, in place
    for _ in range(3):
        tokens, n = rng.integers(3, bundle.vocab_size, (2, 1)), lengths[1:3]
        plain._bindings.clear()
        want = plain.forward(tokens, n[:, None], n.astype(np.int32), 1, 3, np.arange(2))
        np.testing.assert_array_equal(fast.forward(tokens, n[:, None], n.astype(np.int32), 1, 3, np.arange(2)), want)
        lengths[1:3] += 1
    assert len(replays) == 6


def test_the_warm_up_leaves_nothing_a_sequence_reads(tiny_bundle):
    """The CUDA start-time warm-up (every kind of call once, a decode graph per batch size) writes throwaway keys and
    values into empty rows: prompts and decode steps after it get the logits of an engine that never warmed up."""
    bundle = load_bundle(tiny_bundle)
    cold, warm = Engine(bundle, 3, 64, "cpu"), Engine(bundle, 3, 64, "cpu")
    warm.graphs = graphs = DecodeGraphs(warm)
    warm.chunks = chunks = ChunkGraphs(warm)
    assert warm.warm_up(prefill_tokens=32) > 0
    assert sorted(graphs.by_rows) == [1, 2, 3]  # one decode graph per batch size, made before any request
    assert sorted(chunks.by_key) == [(row, L) for row in range(3) for L in (16, 32)]  # and per row and chunk length
    rng = np.random.default_rng(1)
    ids = rng.integers(3, bundle.vocab_size, (3, 4))  # (3, 4): shorter than what the warm-up wrote in each row
    np.testing.assert_array_equal(_prefill(warm, ids), _prefill(cold, ids))
    n = np.array([4, 4, 4])
    for _ in range(3):
        tokens = rng.integers(3, bundle.vocab_size, (3, 1))
        want = cold.forward(tokens, n[:, None], n.astype(np.int32), 0, 3, np.arange(3))
        np.testing.assert_array_equal(warm.forward(tokens, n[:, None], n.astype(np.int32), 0, 3, np.arange(3)), want)
        n += 1


def test_the_warm_up_captures_decode_graphs_up_to_its_bound(tiny_bundle, monkeypatch):
    monkeypatch.setattr("service.cuda_graphs.WARM_GRAPHS", 2)  # each graph keeps a (D, V) buffer: larger D later
    engine = Engine(load_bundle(tiny_bundle), 4, 32, "cpu")
    engine.graphs = graphs = DecodeGraphs(engine)
    engine.warm_up(prefill_tokens=16)
    assert sorted(graphs.by_rows) == [1, 2]


def _call(engine: Engine, ids: np.ndarray, past: int, row: int, wanted: np.ndarray | None = None) -> np.ndarray:
    """ids (1, S): a chunk after `past` positions of cache row `row`; its last logits unless `wanted`."""
    S = ids.shape[1]
    wanted = np.array([S - 1]) if wanted is None else wanted
    positions = np.arange(past, past + S)[None]
    return engine.forward(ids, positions, np.array([past + S - 1], np.int32), row, row + 1, wanted).copy()


def test_the_chunk_graph_path_gives_the_plain_calls_logits(tiny_bundle):
    """A continuing prompt's chunk through the graph path (padded to its bucket, the padding's keys and values written
    past the sequence's end) gives the plain call's logits, and so do the decode steps after it."""
    bundle = load_bundle(tiny_bundle)
    plain, fast = Engine(bundle, 3, 64, "cpu"), Engine(bundle, 3, 64, "cpu")
    fast.chunks = chunks = ChunkGraphs(fast)  # as on CUDA: forward routes continuing chunks to it
    assert chunks.check() <= 1e-5
    replays = []
    run = chunks.run
    chunks.run = lambda *a: replays.append(a[0].shape[1]) or run(*a)  # type: ignore[method-assign]
    rng = np.random.default_rng(2)
    ids = rng.integers(3, bundle.vocab_size, (1, 40))  # one prompt, written in row 1 in pieces
    for start, stop in [(0, 6), (6, 11), (11, 31)]:  # a first prompt (plain), then chunks of 5 and 20 tokens
        np.testing.assert_allclose(
            _call(fast, ids[:, start:stop], start, 1), _call(plain, ids[:, start:stop], start, 1), atol=1e-5
        )
    assert replays == [5, 20] and sorted(chunks.by_key) == [(0, 16), (1, 16), (1, 32)]  # row 0: the check
    for past in range(31, 34):  # decode steps after the padded chunks: the padding's positions are overwritten
        token = rng.integers(3, bundle.vocab_size, (1, 1))
        np.testing.assert_allclose(_call(fast, token, past, 1), _call(plain, token, past, 1), atol=1e-5)
    # the plain path: a chunk whose padding would pass the cache's end, and a chunk whose every position is read
    np.testing.assert_allclose(_call(fast, ids[:, 34:40], 52, 2), _call(plain, ids[:, 34:40], 52, 2), atol=1e-5)
    every = np.arange(4)
    np.testing.assert_allclose(_call(fast, ids[:, :4], 34, 1, every), _call(plain, ids[:, :4], 34, 1, every), atol=1e-5)
    assert replays == [5, 20]


@pytest.mark.parametrize("kind", ["decode", "chunk"])
def test_a_graph_that_fails_while_serving_turns_graphs_off_and_the_call_runs_plainly(kind, tiny_bundle, caplog):
    bundle = load_bundle(tiny_bundle)
    plain, engine = Engine(bundle, 2, 32, "cpu"), Engine(bundle, 2, 32, "cpu")
    graphs = engine.graphs = DecodeGraphs(engine)
    chunks = engine.chunks = ChunkGraphs(engine)

    def capture_fails(*args):
        raise RuntimeError("CUDA failure 2: out of memory\nmore detail")

    ids = np.array([[5, 6, 7, 8]])
    if kind == "decode":  # a one-row decode step
        graphs.run = capture_fails  # type: ignore[method-assign]
        past, new, what = 0, ids[:, :1], "a decode call of 1 row(s)"
    else:  # a continuing prompt's chunk after two tokens written plainly
        chunks.run = capture_fails  # type: ignore[method-assign]
        past, new, what = 2, ids[:, 2:], "a continuing prompt's call of 2 tokens"
        for e in (engine, plain):
            _call(e, ids[:, :2], 0, 0)
    np.testing.assert_array_equal(_call(engine, new, past, 0), _call(plain, new, past, 0))
    assert engine.graphs is None and engine.chunks is None
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"CUDA graphs off: {what} failed: CUDA failure 2: out of memory"
    ]


@pytest.mark.parametrize("graph", [False, True])
def test_reduced_logits_are_the_full_logits_reduction(tiny_bundle, graph):
    """The reducer's graph (on the CPU here, on the device on CUDA) returns each row's 128 largest logits with their
    ids, the logits at the ids asked for, the log-sum-exp and the mass at each row's temperature, from the plain
    path's logits and from the decode graph's buffer alike."""
    from service.sampler import Candidates

    bundle = load_bundle(tiny_bundle)
    plain, reducing = Engine(bundle, 4, 64, "cpu"), Engine(bundle, 4, 64, "cpu", reduce_logits=True)
    if graph:
        reducing.graphs = DecodeGraphs(reducing)
    rng = np.random.default_rng(1)
    tokens, n = rng.integers(3, bundle.vocab_size, (3, 1)), np.zeros(3, np.int64)
    inv_t = np.array([0.0, 5.0, 1.0], np.float32)
    edits = np.array([[7, 9, -1], [-1, -1, -1], [2, 100, 30]])
    want = plain.forward(tokens, n[:, None], n.astype(np.int32), 0, 3, np.arange(3)).copy()  # (3, V)
    c = reducing.forward(tokens, n[:, None], n.astype(np.int32), 0, 3, np.arange(3), (inv_t, edits))
    assert isinstance(c, Candidates)
    np.testing.assert_array_equal(c.full(), want)
    x = want.astype(np.float64)
    np.testing.assert_array_equal(c.values, -np.sort(-want, axis=1)[:, :128])
    np.testing.assert_array_equal(np.take_along_axis(want, c.ids, axis=1), c.values)
    np.testing.assert_allclose(c.lse, np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1), rtol=1e-5)
    mass = np.exp((x - x.max(1, keepdims=True)) * inv_t[:, None]).sum(1)
    np.testing.assert_allclose(c.mass, mass, rtol=1e-4)
    np.testing.assert_array_equal(c.edit_values, np.take_along_axis(want, np.maximum(edits, 0), axis=1))
    assert c.finite.all()
    prefill = reducing.forward(tokens, n[:, None], n.astype(np.int32), 0, 3, np.arange(3))  # no reduce asked
    assert isinstance(prefill, np.ndarray)

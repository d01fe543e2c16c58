"""The torch model against Hugging Face transformers on tiny random configs, with and without the KV cache."""

from __future__ import annotations

import pytest
import torch

from export.checkpoints import build_model, load_hf_dir
from export.model import KVCache, decode_one_token, prefill
from export.ops import gqa_reference
from tests.helpers import FAMILIES, write_hf_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = write_hf_checkpoint(directory, request.param)
    ours = build_model(load_hf_dir(directory))
    return hf, ours


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # (S, V)


def test_logits_without_cache_match_transformers(pair):
    hf, ours = pair
    ids = [5, 17, 42, 99, 3, 250, 7, 11, 64]
    logits = prefill(ours, KVCache(ours.config, 1, len(ids)), [ids])[0]
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_batched_rows_of_different_lengths_with_cache_match_transformers(pair):
    hf, ours = pair
    prompts = [[5, 17, 42, 99, 3, 250, 7], [8, 9], [100, 101, 102, 103]]
    continuations = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35]]
    cache = KVCache(ours.config, len(prompts), 16)
    logits = prefill(ours, cache, prompts)  # right-padded first prompt
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[b, : len(p)], hf_logits(hf, p), atol=ATOL, rtol=0)
    lengths = torch.tensor([len(p) for p in prompts])
    for t in range(5):
        tokens = torch.tensor([c[t] for c in continuations])
        step = decode_one_token(ours, cache, tokens, lengths)  # (B, V), rows at different positions
        lengths = lengths + 1
        for b, p in enumerate(prompts):
            full = p + continuations[b][: t + 1]
            torch.testing.assert_close(step[b], hf_logits(hf, full)[-1], atol=ATOL, rtol=0)


def test_gqa_reference_chunked_prompt_equals_one_shot():
    torch.manual_seed(0)
    H, H_kv, D, S = 4, 2, 8, 10
    q, k, v = torch.randn(1, S, H * D), torch.randn(1, S, H_kv * D), torch.randn(1, S, H_kv * D)
    empty = torch.zeros(1, H_kv, 16, D)
    full, kc, vc = gqa_reference(
        q, k, v, empty, empty, torch.tensor([S - 1], dtype=torch.int32), torch.tensor(S), H, H_kv
    )
    a, kc2, vc2 = gqa_reference(
        q[:, :6], k[:, :6], v[:, :6], empty, empty, torch.tensor([5], dtype=torch.int32), torch.tensor(6), H, H_kv
    )
    b, kc2, vc2 = gqa_reference(
        q[:, 6:], k[:, 6:], v[:, 6:], kc2, vc2, torch.tensor([S - 1], dtype=torch.int32), torch.tensor(S), H, H_kv
    )
    torch.testing.assert_close(torch.cat([a, b], 1), full)
    torch.testing.assert_close(kc2, kc)

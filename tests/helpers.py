"""Test helpers: tiny checkpoints written by the tests themselves (HF safetensors dirs, GGUF files), CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import ortkernels

REPO = Path(__file__).resolve().parents[1]

# Tests of the project's own ops (ortkernels/) and of what only they do: skipped where the library is not built (a
# machine without a C compiler; `make test` builds it wherever there is one, and CI fails a skip)
needs_kernels = pytest.mark.skipif(
    not ortkernels.available(), reason=f"ortkernels/ is not built: {ortkernels.BUILD_HINT}"
)

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ångström — déjà vu",
    "日本語のテキストと中文的句子。",
    "emoji: 🎉🚀👍🏽 and ❤️",
    "def add(a, b):\n    return a + b  # 12345\n",
    "a    b\n\n\n   c\t\td   ",
    "price: $1,234.56 in 2024; x=3.14",
    " leading space and trailing  ",
]


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60, poll: float = 0.02) -> None:
    """Waits for an event the service exposes (a metric, a status, a log line); `timeout` only guards a hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child `python -m ...`: the repo first on PYTHONPATH, the caller's after."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=child_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def train_bpe_tokenizer(vocab_size: int = 400, extra_specials: tuple[str, ...] = ()):
    """A small byte-level BPE with GPT-2's pre-tokenizer, trained on CORPUS; <|endoftext|> is id 0.

    `extra_specials` take ids 3, 4, ... after <|endoftext|>, <|im_start|>, <|im_end|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


LLAMA3_CHAT_TEMPLATE = (  # Llama 3 Instruct's layout: the template writes BOS itself, each turn ends in <|eot_id|>
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Every variant the docs promise, as the tiny transformers config that stands for it. Each is exported, served and
# compared with transformers' own generate() in tests/e2e/test_families.py.
FAMILIES = ("gpt2", "gpt2-untied", "llama", "llama3", "qwen2", "mistral")


def hf_config(family: str, vocab: int, **overrides):
    """A tiny transformers config of one family variant (random weights are enough to compare implementations)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family in ("gpt2", "gpt2-untied"):
        gpt2 = dict(
            vocab_size=vocab,
            n_positions=1024,  # transformers' GGUF reader assumes GPT-2's 1024
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=family == "gpt2",
        )
        return GPT2Config(**{**gpt2, **overrides})
    llama2 = dict(  # the Llama layout every other variant starts from
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    variants = {
        "llama": (LlamaConfig, {}),
        # rope scaling of type llama3 (a short original context, so that it changes short prompts), a list of eos
        # ids as Llama 3 Instruct's <|end_of_text|>, <|eom_id|>, <|eot_id|>
        "llama3": (
            LlamaConfig,
            dict(
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                bos_token_id=3,
                eos_token_id=[4, 2, 7],
            ),
        ),
        # biases on q/k/v, tied embeddings (as Qwen2.5 at small sizes)
        "qwen2": (Qwen2Config, dict(rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=0, tie_word_embeddings=True)),
        # the Llama layout with a sliding window that does not bind at this context
        "mistral": (MistralConfig, dict(head_dim=16, sliding_window=1024)),
    }
    if family not in variants:
        raise ValueError(family)
    cls, changes = variants[family]
    return cls(**{**llama2, **changes, **overrides})


def write_hf_checkpoint(
    directory: Path,
    family: str,
    tokenizer_json: str | None = None,
    seed: int = 0,
    tokenizer_config: dict | None = None,
    generation_config: dict | None = None,
    **overrides,
):
    """save_pretrained of a tiny random model of one of FAMILIES plus tokenizer files; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if tokenizer_json is None:
        tok = train_bpe_tokenizer(extra_specials=LLAMA3_SPECIALS if family == "llama3" else ())
        tokenizer_json = tok.to_str()
    vocab = len(json.loads(tokenizer_json)["model"]["vocab"])
    vocab += len([t for t in json.loads(tokenizer_json).get("added_tokens", []) if t["id"] >= vocab])
    model = AutoModelForCausalLM.from_config(hf_config(family, vocab, **overrides))
    with torch.no_grad():  # random init is tiny; widen it so logits vary and argmax is not degenerate
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
        if model.config.tie_word_embeddings:
            model.tie_weights()
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    tc = tokenizer_config if tokenizer_config is not None else {"chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tc))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (half-split rotary -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_gpt2_from_hf(path: Path, model, tokenizer_json: str) -> None:
    """A gpt2 GGUF laid out as llama.cpp writes one: Conv1D weights transposed to (out, in), fused qkv."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    _add_gguf_tokenizer(w, tokenizer_json, bos=cfg.bos_token_id, eos=cfg.eos_token_id)
    sd = {k.removeprefix("transformer."): v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {
        "wte.weight": "token_embd.weight",
        "wpe.weight": "position_embd.weight",
        "ln_f.weight": "output_norm.weight",
        "ln_f.bias": "output_norm.bias",
    }
    layer = {
        "ln_1": "attn_norm",
        "ln_2": "ffn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for key, arr in sd.items():
        if key in names:
            w.add_tensor(names[key], np.ascontiguousarray(arr))
        elif key.startswith("h."):
            _, i, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            if module not in layer:
                continue  # attn.bias / masked_bias buffers of old checkpoints
            if kind == "weight" and not module.startswith("ln"):
                arr = arr.T  # Conv1D (in, out) -> (out, in)
            w.add_tensor(f"blk.{i}.{layer[module]}.{kind}", np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_gguf_tokenizer(w, tokenizer_json: str, bos: int = 1, eos: int = 2) -> None:
    tj = json.loads(tokenizer_json)
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    special = {t["content"] for t in tj.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def write_gguf_from_hf(
    path: Path,
    model,
    tokenizer_json: str,
    quantize_linears: bool = False,
    quantize_output: bool = False,
    split_count: int | None = None,
) -> None:
    """A llama or qwen2 GGUF with the HF model's weights and a gpt2-style tokenizer, laid out as llama.cpp writes
    them: llama's q/k rows permuted to interleaved rotary pairs, qwen2's left as they are (with q/k/v biases). With
    `quantize_linears` the blocks' linears are Q4_1, with `quantize_output` the unembedding too; `split_count`
    writes llama-gguf-split's `split.count` (the file then reads as one part of several)."""
    import gguf

    cfg = model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"  # llama.cpp writes Mistral as llama
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    _add_gguf_tokenizer(w, tokenizer_json, bos=cfg.bos_token_id, eos=cfg.eos_token_id)
    if split_count is not None:
        w.add_uint16("split.count", split_count)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for key, arr in sd.items():
        if key in names:
            name = names[key]
        else:
            _, _, i, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{layer[module]}.{kind}"
        if arch == "llama" and name.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if (quantize_linears and arr.ndim == 2 and name.startswith("blk.")) or (
            quantize_output and name == "output.weight"
        ):
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_1)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

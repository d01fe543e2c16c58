"""The model configuration: one frozen dataclass covering the GPT-2 and Llama families.

Llama's layout also carries Qwen2 (biases on q, k and v) and Mistral (Llama with a sliding window that we accept
only when it does not bind): `arch` names the checkpoint's own architecture, `family` the switches it uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["gpt2", "llama"]
ARCHES = ("gpt2", "llama", "qwen2", "mistral")  # checkpoint architectures: Hugging Face model_type, GGUF arch
ROPE_TYPES = ("default", "linear", "llama3")  # Hugging Face rope_scaling types we compute exactly


@dataclass(frozen=True)
class ModelConfig:
    family: Family  # gpt2: learned positions, LayerNorm, GELU; llama: RoPE, RMSNorm, SwiGLU, GQA
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int  # < n_head is grouped-query attention; == n_head is plain multi-head attention
    d_model: int
    d_ff: int  # hidden width of the MLP
    max_context: int  # positions the model was trained for (GPT-2's learned table has exactly this many)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama only
    tie_embeddings: bool = True  # unembedding shares the token embedding matrix
    bias: bool = False  # gpt2 linears and norms carry biases; llama's do not
    qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections only
    arch: str = ""  # the checkpoint's architecture (one of ARCHES); "" in manifests written before it existed
    # Hugging Face's rope_scaling dict, normalized: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} or {"rope_type": "linear", "factor": 2.0}
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None  # Mistral/Qwen2: keys further back are masked; exported only if it never binds

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"unsupported model family {self.family!r} (expected 'gpt2' or 'llama')")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

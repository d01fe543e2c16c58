"""The decoder: embedding -> blocks (attention, MLP) -> final norm -> unembedding -> logits, with an explicit KV cache.

One model covers GPT-2 and Llama; their differences are switches on `ModelConfig`.

The KV cache follows onnxruntime's `com.microsoft::GroupQueryAttention` contract, so the torch model and the
exported graph mean the same thing by every input:

- each layer owns two preallocated buffers `(B, H_kv, T_max, D)` (keys and values);
- `seqlens_k` (B,) int32 is each row's total length after this step, minus one;
- `total_sequence_length` is a scalar: the longest row's total length;
- a *first prompt* (S == total_sequence_length) writes its S positions at 0..S-1 of each row (rows may be
  right-padded, each row only attends to its own first seqlens_k+1 keys); otherwise the row's new positions
  end at seqlens_k, i.e. start at seqlens_k + 1 - S. A chunk with S > 1 after a past needs batch 1.

In the exported graph past and present share one buffer, so a step writes only its new positions in place.
The torch forward (ops.py's references) returns updated copies. Llama's rotary positions are derived from
seqlens_k inside the op (`ops.positions`), so only GPT-2's learned positions read `position_ids`.

The graph is a handful of onnxruntime's fused operators per layer, each emitted from an `autograd.Function` in
ops.py whose torch reference sits beside it (norms with the residual add, one packed q/k/v MatMul into attention
with rotary inside, one gate/up MatMul); logits are computed only at the positions `logits_index` selects.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.config import ModelConfig
from export.ops import GeluTanh, GroupQueryAttention, NormOp, SiLU, SkipNormOp, Unembed, rotary_reference

# ------------------------------------------------------------------------------------------------------- modules


class Norm(nn.Module):
    """LayerNorm (GPT-2, with bias) or RMSNorm (Llama); with a residual, adds it first and returns the sum too."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.rms = config.family == "llama"
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(config.d_model))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(norm(residual + x), residual + x); without a residual, (norm(x), None): the sum is x itself."""
        if residual is None:
            return NormOp.apply(x, self.weight, self.bias, self.eps, self.rms), None
        return SkipNormOp.apply(x, residual, self.weight, self.bias, self.eps, self.rms)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """(D/2,) float64 rotary frequencies, with Hugging Face's `linear` or `llama3` scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":  # long wavelengths slowed by `factor`, short ones kept, the band between blended
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryTables(nn.Module):
    """Llama's rotary cos/sin tables, (T_max, D/2) each: GroupQueryAttention's `cos_cache` and `sin_cache`."""

    cos: Tensor
    sin: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        angles = torch.outer(torch.arange(config.max_context, dtype=torch.float64), rope_inv_freq(config))  # (T, D/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)


# q/k/v and gate/up run as one MatMul each; the parts keep their checkpoint names (so loading stays a rename table)
# and the export folds their concatenation into one weight. quantize.py reads this table to pack a GGUF's blocks.
PACKED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class PackedLinear(nn.Module):
    """Several projections of one input as one MatMul, outputs side by side; the weights live on the parent."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.parts = PACKED[name]

    def forward(self, x: Tensor, parent: nn.Module) -> Tensor:
        linears = [getattr(parent, p) for p in self.parts]
        weight = torch.cat([lin.weight for lin in linears])  # (N_total, C)
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        return F.linear(x, weight, bias)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, n_head: int, n_kv_head: int
) -> tuple[Tensor, Tensor]:
    """Attention over a prompt without a cache, in plain torch ops (exportable), with its probabilities.

    q: (B, S, H*D); k, v: (B, S, H_kv*D); position_ids (B, S). Returns the output (B, S, H*D) and the
    probabilities (B, H, S, S): row q is how much query q attends to each key, exactly 0 above the diagonal.
    """
    B, S, _ = q.shape
    D = q.shape[-1] // n_head
    group = n_head // n_kv_head
    queries = q.view(B, S, n_head, D).transpose(1, 2).float()  # (B, H, S, D)
    keys = k.view(B, S, n_kv_head, 1, D).expand(B, S, n_kv_head, group, D).reshape(B, S, n_head, D)
    values = v.view(B, S, n_kv_head, 1, D).expand(B, S, n_kv_head, group, D).reshape(B, S, n_head, D)
    keys, values = keys.transpose(1, 2).float(), values.transpose(1, 2).float()  # (B, H, S, D)
    allowed = position_ids[:, None, :] <= position_ids[:, :, None]  # (B, S_q, S_k)
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(D)  # (B, H, S, S)
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    out = probs @ values  # (B, H, S, D)
    return out.transpose(1, 2).reshape(B, S, n_head * D).to(q.dtype), probs


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.qkv_proj = PackedLinear("qkv_proj")

    def forward(
        self,
        x: Tensor,
        rope: RotaryTables | None,
        seqlens_k: Tensor,
        total_len: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        qkv = self.qkv_proj(x, self)  # (B, S, (H + 2 H_kv) * D)
        cos, sin = (rope.cos, rope.sin) if rope is not None else (None, None)
        y, k_cache, v_cache = GroupQueryAttention.apply(
            qkv, k_cache, v_cache, seqlens_k, total_len, cos, sin, self.n_head, self.n_kv_head
        )
        return self.o_proj(y), k_cache, v_cache

    def inspect(self, x: Tensor, rope: RotaryTables | None, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """A whole prompt without a cache, attention explicit: the output and the probabilities (B, H, S, S).

        The same packed q/k/v weight as the serving graph, so the inspection graph shares it on disk."""
        B, S, _ = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x, self).split([H * D, H_kv * D, H_kv * D], dim=-1)
        if rope is not None:
            q = rotary_reference(q.reshape(B, S, H, D), rope.cos, rope.sin, position_ids).reshape(B, S, -1)
            k = rotary_reference(k.reshape(B, S, H_kv, D), rope.cos, rope.sin, position_ids).reshape(B, S, -1)
        y, probs = causal_attention(q, k, v, position_ids, H, H_kv)
        return self.o_proj(y), probs


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))); Llama: down(silu(gate(x)) * up(x)), gate and up as one MatMul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated, self.d_ff = config.family == "llama", config.d_ff  # a Python int: one Split, no Shape chain
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias) if self.gated else None
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.gate_up_proj = PackedLinear("gate_up_proj") if self.gated else None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x, self).split([self.d_ff, self.d_ff], dim=-1)  # (B, S, F) each
            return self.down_proj(SiLU.apply(gate) * up)
        return self.down_proj(GeluTanh.apply(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm block. The residual add is fused into the next norm: each block takes the previous sublayer's output
    `x` still to be added to `residual` (None for the first block, whose x is the embedding) and returns its MLP's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        rope: RotaryTables | None,
        seqlens_k: Tensor,
        total_len: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h, total = self.attn_norm(x, residual)
        residual = x if total is None else total
        a, k_cache, v_cache = self.attn(h, rope, seqlens_k, total_len, k_cache, v_cache)
        h, total = self.mlp_norm(a, residual)
        return self.mlp(h), cast(Tensor, total), k_cache, v_cache

    def inspect(
        self, x: Tensor, residual: Tensor | None, rope: RotaryTables | None, position_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        h, total = self.attn_norm(x, residual)
        residual = x if total is None else total
        a, probs = self.attn.inspect(h, rope, position_ids)
        h, total = self.mlp_norm(a, residual)
        return self.mlp(h), cast(Tensor, total), probs


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embeddings = nn.Embedding(config.max_context, config.d_model) if config.family == "gpt2" else None
        self.rope = RotaryTables(config) if config.family == "llama" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = Norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def forward(
        self,
        input_ids: Tensor,  # (B, S) int64
        position_ids: Tensor | None,  # (B, S) int64: GPT-2's learned positions; Llama's come from seqlens_k
        seqlens_k: Tensor,  # (B,) int32: total length after this step - 1
        total_sequence_length: Tensor,  # () int32: max over rows of seqlens_k + 1
        logits_index: Tensor,  # (N,) int64: rows of the flattened (B*S) positions whose logits are computed
        *cache: Tensor,  # 2 * n_layer buffers, (B, H_kv, T_max, D): layer 0 key, layer 0 value, layer 1 key, ...
    ) -> tuple[Tensor, ...]:
        x = self.tok_embeddings(input_ids)  # (B, S, C)
        if self.pos_embeddings is not None and position_ids is not None:
            x = x + self.pos_embeddings(position_ids)
        residual: Tensor | None = None
        present: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, residual, k, v = block(
                x, residual, self.rope, seqlens_k, total_sequence_length, cache[2 * i], cache[2 * i + 1]
            )
            present += [k, v]
        x, _ = self.norm(x, residual)  # (B, S, C)
        x = x.reshape(-1, self.config.d_model)[logits_index]  # (N, C): only the positions whose logits are read
        logits = Unembed.apply(x, self.lm_head.weight)  # (N, V)
        if logits.dtype != torch.float32:  # fp32 logits whatever the weights' dtype
            logits = logits.float()
        return (logits, *present)

    def inspect(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """One prompt (1, S), no cache, attention in plain torch ops: logits (1, S, V) and every layer's attention
        probabilities (n_layer, H, S, S). What the bundle's inspection graph is exported from."""
        position_ids = torch.ones_like(input_ids).cumsum(-1) - 1  # (1, S): 0..S-1, traced with a dynamic S
        x = self.tok_embeddings(input_ids)  # (1, S, C)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(position_ids)
        residual: Tensor | None = None
        probs: list[Tensor] = []
        for block in self.blocks:
            x, residual, p = cast(Block, block).inspect(x, residual, self.rope, position_ids)
            probs.append(p[0])
        x, _ = self.norm(x, residual)  # (1, S, C)
        logits = Unembed.apply(x[0], self.lm_head.weight).float()  # (S, V)
        return logits[None], torch.stack(probs)


class KVCache:
    """Torch-side cache for reference generation: one key and one value buffer per layer, (B, H_kv, T_max, D)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, config.n_kv_head, max_len, config.head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype) for _ in range(2 * config.n_layer)]

    def update(self, present: tuple[Tensor, ...]) -> None:
        self.buffers = list(present)


@torch.no_grad()
def prefill(model: GPT, cache: KVCache, prompts: list[list[int]]) -> Tensor:
    """First prompt of every row, right-padded to the longest.

    Returns logits (B, S_max, V); row b is valid up to its own length.
    """
    lengths = torch.tensor([len(p) for p in prompts])
    S = int(lengths.max())
    input_ids = torch.zeros(len(prompts), S, dtype=torch.long)  # (B, S)
    for b, p in enumerate(prompts):
        input_ids[b, : len(p)] = torch.tensor(p)
    position_ids = torch.arange(S).expand(len(prompts), S)  # (B, S)
    seqlens_k = (lengths - 1).to(torch.int32)
    every = torch.arange(len(prompts) * S)  # logits at every position
    out = model(input_ids, position_ids, seqlens_k, torch.tensor(S, dtype=torch.int32), every, *cache.buffers)
    cache.update(out[1:])
    return out[0].view(len(prompts), S, -1)


@torch.no_grad()
def decode_one_token(model: GPT, cache: KVCache, tokens: Tensor, lengths: Tensor) -> Tensor:
    """One new token per row; `lengths` (B,) are the positions each row already holds. Returns logits (B, V)."""
    seqlens_k = lengths.to(torch.int32)  # total after the step (lengths + 1) minus one
    total = torch.tensor(int(lengths.max()) + 1, dtype=torch.int32)
    out = model(tokens[:, None], lengths[:, None].long(), seqlens_k, total, torch.arange(len(tokens)), *cache.buffers)
    cache.update(out[1:])
    return out[0]

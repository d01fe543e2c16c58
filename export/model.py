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
The torch forward below is the reference for that op and returns updated copies.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.config import ModelConfig


class Norm(nn.Module):
    """LayerNorm (GPT-2, with bias) or RMSNorm (Llama), computed in fp32 like the references."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.rms = config.family == "llama"
        self.eps = config.norm_eps
        self.shape = (config.d_model,)  # a Python constant: a traced x.shape[-1] would export as a dynamic Gather
        self.weight = nn.Parameter(torch.ones(config.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(config.d_model))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if self.rms:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dtype)
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x, self.shape, self.weight.float(), bias, self.eps).to(dtype)


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


class RotaryEmbedding(nn.Module):
    """Llama's rotary positions in the half-split (rotate_half) layout of Hugging Face checkpoints."""

    cos: Tensor  # (T_max, D/2)
    sin: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config)  # (D/2,)
        angles = torch.outer(torch.arange(config.max_context, dtype=torch.float64), inv_freq)  # (T, D/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        # x: (B, S, H, D); position_ids: (B, S)
        cos = self.cos[position_ids].unsqueeze(2)  # (B, S, 1, D/2)
        sin = self.sin[position_ids].unsqueeze(2)
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


def gqa_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    total_len: Tensor,
    n_head: int,
    n_kv_head: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupQueryAttention's semantics in torch. q: (B, S, H*D); k, v: (B, S, H_kv*D); caches (B, H_kv, T_max, D)."""
    B, S, _ = q.shape
    D = k_cache.shape[-1]
    total = seqlens_k.long() + 1  # (B,) each row's length after this step
    first_prompt = S == int(total_len)
    past = torch.zeros_like(total) if first_prompt else total - S  # (B,) where this step's positions start

    pos = past[:, None] + torch.arange(S)  # (B, S)
    index = pos[:, None, :, None].expand(B, n_kv_head, S, D)
    k_cache = k_cache.scatter(2, index, k.view(B, S, n_kv_head, D).transpose(1, 2).to(k_cache.dtype))
    v_cache = v_cache.scatter(2, index, v.view(B, S, n_kv_head, D).transpose(1, 2).to(v_cache.dtype))

    T = int(total_len)
    keys = k_cache[:, :, :T].repeat_interleave(n_head // n_kv_head, dim=1).float()  # (B, H, T, D)
    values = v_cache[:, :, :T].repeat_interleave(n_head // n_kv_head, dim=1).float()
    queries = q.view(B, S, n_head, D).transpose(1, 2).float()  # (B, H, S, D)

    j = torch.arange(T)
    allowed = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < total[:, None, None])  # (B, S, T)
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(D)  # (B, H, S, T)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # (B, H, S, D)
    return out.transpose(1, 2).reshape(B, S, n_head * D).to(q.dtype), k_cache, v_cache


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


class GroupQueryAttention(torch.autograd.Function):
    """Runs `gqa_reference` in torch; exports as one `com.microsoft::GroupQueryAttention` node."""

    @staticmethod
    def forward(ctx, q, k, v, k_cache, v_cache, seqlens_k, total_len, n_head, n_kv_head):  # type: ignore[override]
        return gqa_reference(q, k, v, k_cache, v_cache, seqlens_k, total_len, n_head, n_kv_head)

    @staticmethod
    def symbolic(g, q, k, v, k_cache, v_cache, seqlens_k, total_len, n_head, n_kv_head):  # type: ignore[no-untyped-def]
        out, k_out, v_out = g.op(
            "com.microsoft::GroupQueryAttention",
            q,
            k,
            v,
            k_cache,
            v_cache,
            seqlens_k,
            total_len,
            num_heads_i=n_head,
            kv_num_heads_i=n_kv_head,
            outputs=3,
        )
        out.setType(q.type())  # the exporter cannot infer a contrib op's outputs: same as query and the caches
        k_out.setType(k_cache.type())
        v_out.setType(v_cache.type())
        return out, k_out, v_out


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
        self.rotary = RotaryEmbedding(config) if config.family == "llama" else None

    def forward(
        self, x: Tensor, position_ids: Tensor, seqlens_k: Tensor, total_len: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x, position_ids)
        y, k_cache, v_cache = GroupQueryAttention.apply(
            q, k, v, k_cache, v_cache, seqlens_k, total_len, self.n_head, self.n_kv_head
        )
        return self.o_proj(y), k_cache, v_cache

    def project(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, S, H*D), (B, S, H_kv*D) x2
        if self.rotary is not None:
            q = self.rotary(q.view(B, S, self.n_head, self.head_dim), position_ids).view(B, S, -1)
            k = self.rotary(k.view(B, S, self.n_kv_head, self.head_dim), position_ids).view(B, S, -1)
        return q, k, v

    def inspect(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """A whole prompt without a cache: the output and the probabilities (B, H, S, S)."""
        q, k, v = self.project(x, position_ids)
        y, probs = causal_attention(q, k, v, position_ids, self.n_head, self.n_kv_head)
        return self.o_proj(y), probs


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))); Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.family == "llama"
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias) if self.gated else None
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, position_ids: Tensor, seqlens_k: Tensor, total_len: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, k_cache, v_cache = self.attn(self.attn_norm(x), position_ids, seqlens_k, total_len, k_cache, v_cache)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, k_cache, v_cache

    def inspect(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        a, probs = self.attn.inspect(self.attn_norm(x), position_ids)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, probs


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embeddings = nn.Embedding(config.max_context, config.d_model) if config.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = Norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def forward(
        self,
        input_ids: Tensor,  # (B, S) int64
        position_ids: Tensor,  # (B, S) int64
        seqlens_k: Tensor,  # (B,) int32: total length after this step - 1
        total_sequence_length: Tensor,  # () int32: max over rows of seqlens_k + 1
        *cache: Tensor,  # 2 * n_layer buffers, (B, H_kv, T_max, D): layer 0 key, layer 0 value, layer 1 key, ...
    ) -> tuple[Tensor, ...]:
        x = self.tok_embeddings(input_ids)  # (B, S, C)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(position_ids)
        present: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, position_ids, seqlens_k, total_sequence_length, cache[2 * i], cache[2 * i + 1])
            present += [k, v]
        logits = self.lm_head(self.norm(x)).float()  # (B, S, V), fp32 whatever the weights' dtype
        return (logits, *present)

    def inspect(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """One prompt (1, S), no cache, attention in plain torch ops: logits (1, S, V) and every layer's attention
        probabilities (n_layer, H, S, S). What the bundle's inspection graph is exported from."""
        position_ids = torch.ones_like(input_ids).cumsum(-1) - 1  # (1, S): 0..S-1, traced with a dynamic S
        x = self.tok_embeddings(input_ids)  # (1, S, C)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(position_ids)
        probs: list[Tensor] = []
        for block in self.blocks:
            x, p = cast(Block, block).inspect(x, position_ids)
            probs.append(p[0])
        logits = self.lm_head(self.norm(x)).float()  # (1, S, V)
        return logits, torch.stack(probs)


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
    out = model(input_ids, position_ids, seqlens_k, torch.tensor(S, dtype=torch.int32), *cache.buffers)
    cache.update(out[1:])
    return out[0]


@torch.no_grad()
def decode_one_token(model: GPT, cache: KVCache, tokens: Tensor, lengths: Tensor) -> Tensor:
    """One new token per row; `lengths` (B,) are the positions each row already holds. Returns logits (B, V)."""
    seqlens_k = lengths.to(torch.int32)  # total after the step (lengths + 1) minus one
    total = torch.tensor(int(lengths.max()) + 1, dtype=torch.int32)
    out = model(tokens[:, None], lengths[:, None].long(), seqlens_k, total, *cache.buffers)
    cache.update(out[1:])
    return out[0][:, 0]

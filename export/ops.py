"""onnxruntime's fused operators, each a `torch.autograd.Function`: `forward` runs the torch reference written beside
it, `symbolic` emits the one fused node. The torch model (model.py) always computes the references, so the exported
graph and the model mean the same thing, and an inspection can call the references directly.

The KV cache and position conventions are GroupQueryAttention's (see model.py's docstring).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def norm_reference(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, rms: bool) -> Tensor:
    """LayerNorm (GPT-2, with bias) or RMSNorm (Llama) over the last axis, computed in fp32 like the references."""
    dtype = x.dtype
    x = x if dtype == torch.float32 else x.float()  # a no-op .float() would be traced as a Cast on the input
    if rms:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)
    b = None if bias is None else bias.float()
    return F.layer_norm(x, x.shape[-1:], weight.float(), b, eps).to(dtype)


class NormOp(torch.autograd.Function):
    """`norm_reference`; exports as `SimplifiedLayerNormalization` (RMSNorm) or `LayerNormalization`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):  # type: ignore[override]
        return norm_reference(x, weight, bias, eps, rms)

    @staticmethod
    def symbolic(g, x, weight, bias, eps, rms):  # type: ignore[no-untyped-def]
        if rms:  # onnxruntime registers it in the ONNX domain
            out = g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        else:
            out = g.op("LayerNormalization", x, weight, bias, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        out.setType(x.type())
        return out


class SkipNormOp(torch.autograd.Function):
    """(norm(residual + x), residual + x); exports as `com.microsoft::Skip[Simplified]LayerNormalization`."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms):  # type: ignore[override]
        total = residual + x
        return norm_reference(total, weight, bias, eps, rms), total

    @staticmethod
    def symbolic(g, x, residual, weight, bias, eps, rms):  # type: ignore[no-untyped-def]
        op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
        args = (x, residual, weight) if rms else (x, residual, weight, bias)
        # outputs: normalized, mean, inv_std_var, input + skip (the unused two are dropped after export)
        out, _, _, total = g.op(f"com.microsoft::{op}", *args, epsilon_f=eps, outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


def positions(seqlens_k: Tensor, total_len: Tensor, S: int) -> Tensor:
    """(B, S) int64: the position of each new token, derived from seqlens_k as GroupQueryAttention derives it.

    A first prompt (S == total_sequence_length) sits at 0..S-1 of every row; otherwise a row's S new tokens end at
    seqlens_k. (Right padding of a first prompt gets positions past the row's end: never attended, never read.)
    """
    total = seqlens_k.long() + 1  # (B,) each row's length after this step
    past = torch.zeros_like(total) if S == int(total_len) else total - S
    return past[:, None] + torch.arange(S)


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor) -> Tensor:
    """Rotary positions in the half-split (rotate_half) layout. x: (B, S, H, D); cos, sin: (T_max, D/2); pos: (B, S)."""
    c = cos[pos].unsqueeze(2).float()  # (B, S, 1, D/2)
    s = sin[pos].unsqueeze(2).float()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


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
    pos = positions(seqlens_k, total_len, S)  # (B, S)
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


def packed_gqa_reference(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    total_len: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    n_head: int,
    n_kv_head: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupQueryAttention over packed q/k/v (B, S, (H + 2 H_kv) * D), rotating q and k first when given cos/sin."""
    B, S, _ = qkv.shape
    D = k_cache.shape[-1]
    q, k, v = qkv.split([n_head * D, n_kv_head * D, n_kv_head * D], dim=-1)
    if cos is not None and sin is not None:
        pos = positions(seqlens_k, total_len, S)
        q = rotary_reference(q.view(B, S, n_head, D), cos, sin, pos).view(B, S, -1)
        k = rotary_reference(k.view(B, S, n_kv_head, D), cos, sin, pos).view(B, S, -1)
    return gqa_reference(q, k, v, k_cache, v_cache, seqlens_k, total_len, n_head, n_kv_head)


class GroupQueryAttention(torch.autograd.Function):
    """`packed_gqa_reference`; exports as one `com.microsoft::GroupQueryAttention` node (packed QKV, rotary inside)."""

    @staticmethod
    def forward(ctx, qkv, k_cache, v_cache, seqlens_k, total_len, cos, sin, n_head, n_kv_head):  # type: ignore[override]
        return packed_gqa_reference(qkv, k_cache, v_cache, seqlens_k, total_len, cos, sin, n_head, n_kv_head)

    @staticmethod
    def symbolic(g, qkv, k_cache, v_cache, seqlens_k, total_len, cos, sin, n_head, n_kv_head):  # type: ignore[no-untyped-def]
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor as omitted

        rotary = cos is not None
        out, k_out, v_out = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv,
            omitted(g),  # key and value: packed into the query input
            omitted(g),
            k_cache,
            v_cache,
            seqlens_k,
            total_len,
            *((cos, sin) if rotary else ()),
            num_heads_i=n_head,
            kv_num_heads_i=n_kv_head,
            do_rotary_i=int(rotary),
            rotary_interleaved_i=0,
            outputs=3,
        )
        # the exporter cannot infer a contrib op's outputs: (B, S, H*D) in the query's dtype, and the caches'
        out.setType(qkv.type().with_sizes([None, None, None]))
        k_out.setType(k_cache.type())
        v_out.setType(v_cache.type())
        return out, k_out, v_out


class SiLU(torch.autograd.Function):
    """x * sigmoid(x); exports as `com.microsoft::QuickGelu` with alpha 1, which is exactly that."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return F.silu(x)

    @staticmethod
    def symbolic(g, x):  # type: ignore[no-untyped-def]
        out = g.op("com.microsoft::QuickGelu", x, alpha_f=1.0)
        out.setType(x.type())
        return out


class GeluTanh(torch.autograd.Function):
    """GPT-2's gelu_new (the tanh approximation); exports as `com.microsoft::FastGelu`, which is that formula."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def symbolic(g, x):  # type: ignore[no-untyped-def]
        out = g.op("com.microsoft::FastGelu", x)
        out.setType(x.type())
        return out


class Unembed(torch.autograd.Function):
    """x @ weight^T for x (N, C); exports as `Gemm(transB=1)`, so a tied embedding is stored once."""

    @staticmethod
    def forward(ctx, x, weight):  # type: ignore[override]
        return x @ weight.t()

    @staticmethod
    def symbolic(g, x, weight):  # type: ignore[no-untyped-def]
        return g.op("Gemm", x, weight, transB_i=1)

"""Eager, explicit reference implementations the tests check vlmzip's hook-based code against."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate-half, written out: (..., Dh) -> (..., Dh)."""
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def eager_layer(layer, hidden, cos, sin, allowed):
    """One Llama decoder layer with explicit attention probabilities: returns (output, probs (B, H, L, L))."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, -1)
    hidden = hidden + attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), probs

"""Attention signals recomputed from captured queries and keys (no eager attention needed).

Forward hooks capture one layer's ``q_proj`` / ``k_proj`` outputs while the model keeps its SDPA or
FlashAttention kernels; these functions rebuild only the attention rows a method needs.
Shapes: B batch, T tokens, H heads, Dh head dim; q and k arrive as (B, T, H * Dh).
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H * Dh) -> (B, H, T, Dh) in float32."""
    batch, tokens, width = x.shape
    return x.float().view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def head_mean_keys(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H * Dh) keys -> (B, T, Dh) averaged over heads (VisionZip's merging metric)."""
    return split_heads(k, num_heads).mean(dim=1)


def query_row_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float, row: int = 0) -> torch.Tensor:
    """Softmax attention of query ``row`` over all keys, summed over heads: (B, T).

    Equals ``attn_probs[:, :, row, :].sum(1)`` of an eager run (no mask: encoders attend to all tokens).
    """
    qh = split_heads(q[:, row : row + 1], num_heads)  # (B, H, 1, Dh)
    kh = split_heads(k, num_heads)  # (B, H, T, Dh)
    probs = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, T)
    return probs.squeeze(2).sum(dim=1)


def received_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention each token receives, averaged over heads and over all queries: (B, T)."""
    qh = split_heads(q, num_heads)
    kh = split_heads(k, num_heads)
    probs = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)  # (B, H, T, T)
    return probs.mean(dim=(1, 2))


def content_seeds(pixels: torch.Tensor) -> torch.Tensor:
    """(B, ...) pixel tensor -> (B,) int64 hash of each row's values, computed on its device (no host sync).

    Exact for identical inputs (integer arithmetic after quantising to 1/1024), so an image gets the same
    seed whatever its batch position or the batch size.
    """
    flat = pixels.reshape(pixels.shape[0], -1)
    q = torch.round(flat.float() * 1024).to(torch.int64)
    weights = torch.arange(1, flat.shape[1] + 1, device=pixels.device, dtype=torch.int64) * 2654435761 + 97531
    return (q * weights).sum(dim=1)


# Query rows per chunk when rebuilding a segment's attention (bounds memory at H x chunk x n floats).
QUERY_CHUNK = 1024


def segment_received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, n, Dh) queries and keys of one attention segment -> (n,) attention each key receives,
    mean over heads and queries (float32; queries processed in chunks, never a full H x n x n tensor
    beyond ``QUERY_CHUNK`` rows; vlmzip's Qwen-VL adapter and its vLLM plugin)."""
    heads, n, _ = q.shape
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    for start in range(0, n, QUERY_CHUNK):
        probs = torch.softmax((q[:, start : start + QUERY_CHUNK] @ k.transpose(-1, -2)) * scale, dim=-1)
        total += probs.sum(dim=(0, 1))
    return total / (heads * n)

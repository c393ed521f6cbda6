"""Shrinking the runs of image placeholders in a token sequence (pure tensor functions).

A processor expands each image into N placeholder tokens; a compressed model sends K <= N tokens per
image, so the sequence the LLM sees must hold K placeholders per image. These functions turn a batch
of (input_ids, attention_mask, labels, position_ids) for N into the same batch for K, keeping text
tokens, padding side and position offsets consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Shrunk:
    """A batch after shrinking: every tensor (B, L') except ``kept`` (B, L') long, the original column
    of each new slot (-1 for added padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    kept: torch.Tensor


def image_runs(row: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``image_token_id`` in a 1-D id tensor."""
    is_img = (row == image_token_id).to(torch.int8)
    if not bool(is_img.any()):
        return []
    edges = torch.diff(torch.cat([is_img.new_zeros(1), is_img, is_img.new_zeros(1)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return [(s, e - s) for s, e in zip(starts, ends, strict=True)]


def keep_mask(input_ids: torch.Tensor, image_token_id: int, per_image: int, kept_per_image: int) -> torch.Tensor:
    """(B, L) bool: True for every slot to keep when each image's ``per_image`` placeholders become
    ``kept_per_image``. A run of m * per_image placeholders (m adjacent images) keeps m * kept_per_image.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        for start, length in image_runs(input_ids[b], image_token_id):
            if length % per_image:
                raise ValueError(
                    f"row {b} has a run of {length} image placeholders, not a multiple of the {per_image} "
                    "this model expands an image into; build the prompt with this model's processor"
                )
            keep[b, start + (length // per_image) * kept_per_image : start + length] = False
    return keep


def padding_side(attention_mask: torch.Tensor | None) -> str:
    """'left' or 'right', read off a (B, L) attention mask; 'left' when nothing is padded."""
    if attention_mask is None or attention_mask.ndim != 2:
        return "left"
    if bool((attention_mask[:, -1] == 0).any()) and not bool((attention_mask[:, 0] == 0).any()):
        return "right"
    return "left"


def shrink(
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> Shrunk:
    """Drop the slots where ``keep`` (B, L) is False and re-pad rows to a common length.

    Rows that lose different numbers of slots are padded on the side the batch is padded on
    (pad id, mask 0, label -100). Given ``position_ids`` (B, L), kept slots keep their value minus
    the number of slots dropped before them, so positions stay contiguous with any offset preserved.
    """
    batch, length = input_ids.shape
    lengths = keep.sum(dim=1)
    new_len = int(lengths.max())
    side = padding_side(attention_mask)
    columns = torch.arange(length, device=input_ids.device).expand(batch, length)
    kept = torch.full((batch, new_len), -1, dtype=torch.long, device=input_ids.device)
    for b in range(batch):
        cols = columns[b][keep[b]]
        if side == "left":
            kept[b, new_len - cols.numel() :] = cols
        else:
            kept[b, : cols.numel()] = cols
    valid = kept >= 0
    safe = kept.clamp(min=0)

    def take(t: torch.Tensor, fill: int) -> torch.Tensor:
        out = t.gather(1, safe)
        return out.masked_fill(~valid, fill)

    new_pos = None
    if position_ids is not None:
        dropped_before = torch.cumsum((~keep).long(), dim=1)
        new_pos = take(position_ids - dropped_before.to(position_ids.dtype), 1)
    return Shrunk(
        input_ids=take(input_ids, pad_token_id),
        attention_mask=None if attention_mask is None else take(attention_mask, 0),
        labels=None if labels is None else take(labels, -100),
        position_ids=new_pos,
        kept=kept,
    )

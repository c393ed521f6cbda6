"""Shrinking the runs of image placeholders in a token sequence (pure tensor functions, on the host).

A processor expands each image (or video) into placeholder tokens; a compressed model sends fewer tokens for
it, so the sequence the LLM sees must hold fewer placeholders. An :class:`Item` says how an image's
placeholders sit in the sequence: one run (LLaVA, LLaVA-NeXT, Qwen-VL), or several runs with text between
them (one per tile where the processor writes a tag before each tile, e.g. ``<row_1_col_1>``), and how many
time steps it covers (video frames). These functions find each run, decide which slots stay (the first
``kept`` of each run), and turn a batch of (input_ids, attention_mask, labels, ...) for the vanilla counts
into the same batch for the kept counts, keeping text tokens and the batch's padding side. Items are
numbered in the processor's order: row by row, left to right (per placeholder token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Item:
    """One image or video of a call as the LLM sequence holds it.

    - ``token_id``: the placeholder token of its runs (an image's or a video's).
    - ``segments``: the vanilla placeholder count of each of its runs, in order; text may sit between runs.
    - ``frames``: time steps it covers: 1 for an image, the frames (or temporal patches) of a video; a
      per-frame budget is ``frames`` times the tokens per frame.
    """

    token_id: int
    segments: tuple[int, ...]
    frames: int = 1

    @property
    def vanilla(self) -> int:
        """Placeholders the vanilla model has for this item (all its runs)."""
        return sum(self.segments)


@dataclass
class ImageSpan:
    """One run of one image in one row: the image's number in the call, the run's number within the image,
    where the run starts, its vanilla and kept counts."""

    image: int
    row: int
    start: int
    vanilla: int
    kept: int
    segment: int = 0


@dataclass
class Shrunk:
    """A batch after shrinking.

    - ``columns``: (B, L') long, the original column of each new slot (-1 for padding the shrink added).
    - ``spans``: every run of every image in the *original* columns, in the processor's order.
    - ``input_ids``, ``attention_mask``, ``labels``: (B, L') or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    columns: torch.Tensor
    spans: list[ImageSpan]

    @property
    def changed(self) -> bool:
        return any(s.kept != s.vanilla for s in self.spans)


def image_runs(row: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token_id`` in a 1-D id tensor."""
    is_img = (row == token_id).to(torch.int8)
    if not bool(is_img.any()):
        return []
    edges = torch.diff(torch.cat([is_img.new_zeros(1), is_img, is_img.new_zeros(1)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return [(s, e - s) for s, e in zip(starts, ends, strict=True)]


def image_spans(input_ids: torch.Tensor, items: list[Item], kept: list[tuple[int, ...]]) -> list[ImageSpan]:
    """Assign every run of every item (``kept[i][j]``: placeholders item ``i`` keeps of its run ``j``) to the
    placeholder runs of ``input_ids`` (B, L), per placeholder token in item order. Returns the spans in item
    order, runs in order within an item.

    A run of the sequence may hold several adjacent runs (of one item, or of consecutive items); an item's run
    never crosses a gap. Raises ``ValueError`` when the runs do not add up to the items (a prompt not built by
    this model's processor, or images missing / extra).
    """
    spans: list[ImageSpan] = []
    for token_id in dict.fromkeys(item.token_id for item in items):
        numbers = [i for i, item in enumerate(items) if item.token_id == token_id]
        spans += _token_spans(input_ids, token_id, [items[i] for i in numbers], [kept[i] for i in numbers], numbers)
    return sorted(spans, key=lambda s: (s.image, s.segment))


def _token_spans(input_ids: torch.Tensor, token_id: int, items: list[Item], kept: list[tuple[int, ...]],
                 numbers: list[int]) -> list[ImageSpan]:
    """:func:`image_spans` for the items of one placeholder token (``numbers``: their numbers in the call)."""
    queue = [(i, j, n) for i, item in enumerate(items) for j, n in enumerate(item.segments)]
    counts = ", ".join(str(item.vanilla) for item in items)
    spans: list[ImageSpan] = []
    at = 0
    for b in range(input_ids.shape[0]):
        for start, length in image_runs(input_ids[b], token_id):
            covered = 0
            while covered < length:
                if at >= len(queue):
                    raise ValueError(
                        f"row {b} has more image placeholders than the {len(items)} image(s) passed "
                        f"({sum(item.vanilla for item in items)} placeholders expected in all); build the prompt "
                        "with this model's processor"
                    )
                i, j, n = queue[at]
                spans.append(ImageSpan(numbers[i], b, start + covered, n, kept[i][j], j))
                covered += n
                at += 1
            if covered != length:
                raise ValueError(
                    f"row {b} has a run of {length} image placeholders that does not match the images' token "
                    f"counts ({counts}); build the prompt with this model's processor from the same images"
                )
    if at != len(queue):
        placed = len({numbers[queue[k][0]] for k in range(at)})
        raise ValueError(
            f"the prompt holds placeholders for {placed} image(s) but {len(items)} were passed; "
            "build the prompt with this model's processor"
        )
    return spans


def keep_mask(shape: tuple[int, int], spans: list[ImageSpan]) -> torch.Tensor:
    """(B, L) bool: False for the slots each image gives up (the last N_i - K_i of its run)."""
    keep = torch.ones(shape, dtype=torch.bool)
    for s in spans:
        keep[s.row, s.start + s.kept : s.start + s.vanilla] = False
    return keep


def compact(keep: torch.Tensor, side: str) -> torch.Tensor:
    """(B, L) bool -> (B, L') long: the kept columns of each row, padded with -1 on ``side`` to a common length."""
    batch = keep.shape[0]
    lengths = keep.sum(dim=1).tolist()
    new_len = max(lengths) if lengths else 0
    columns = torch.full((batch, new_len), -1, dtype=torch.long)
    for b in range(batch):
        cols = keep[b].nonzero().squeeze(1)
        if side == "left":
            columns[b, new_len - cols.numel() :] = cols
        else:
            columns[b, : cols.numel()] = cols
    return columns


def take(t: torch.Tensor, columns: torch.Tensor, fill: int | float) -> torch.Tensor:
    """Gather (B, L, ...) ``t`` at (B, L') ``columns`` along dim 1; -1 slots get ``fill``."""
    valid = columns >= 0
    idx = columns.clamp(min=0).to(t.device)
    if t.ndim > 2:
        idx = idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(*idx.shape, *t.shape[2:])
    out = t.gather(1, idx)
    mask = valid.to(t.device).view(*valid.shape, *([1] * (t.ndim - 2)))
    return out.masked_fill(~mask, fill)


def shrink(
    input_ids: torch.Tensor,
    spans: list[ImageSpan],
    side: str,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> Shrunk:
    """Drop the slots each image gives up and re-pad the rows to a common length on ``side``.

    Rows that lose different numbers of slots get padding (pad id, mask 0, label -100); when the batch
    came without an attention mask and padding had to be added, a mask is made so the padding is masked.
    """
    keep = keep_mask(tuple(input_ids.shape), spans)
    columns = compact(keep, side)
    padded = bool((columns < 0).any())
    if attention_mask is None and padded:
        attention_mask = torch.ones_like(input_ids)
    return Shrunk(
        input_ids=take(input_ids, columns, pad_token_id),
        attention_mask=None if attention_mask is None else take(attention_mask, columns, 0),
        labels=None if labels is None else take(labels, columns, -100),
        columns=columns,
        spans=spans,
    )


def shrink_positions(position_ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, L) 1-D positions -> (B, L'): kept slots keep their value minus the slots dropped before them."""
    keep = torch.zeros(columns.shape[0], position_ids.shape[1], dtype=torch.bool)
    for b in range(columns.shape[0]):
        keep[b, columns[b][columns[b] >= 0]] = True
    dropped_before = torch.cumsum((~keep).long(), dim=1).to(position_ids.device)
    return take(position_ids - dropped_before.to(position_ids.dtype), columns, 1)

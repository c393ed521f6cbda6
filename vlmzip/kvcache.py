"""What vlmzip remembers about a KV cache that a compressed model filled, for the whole life of that cache.

A transformers ``Cache`` holds keys and values per decoder layer; it does not know that the sequence was
shrunk before the LLM or pruned inside it. vlmzip keeps, per cache object (weakly: the record goes with the
cache), a :class:`CacheRecord`:

- **created** by the first prefill that prunes inside the LLM (``note_pruned``) or by a compressed
  ``generate`` (``remember_prompt``: how the caller's prompt maps to the shrunk one, so a later turn whose
  ids start with that prompt can be mapped onto the cache, :func:`map_later_turn`);
- **read** by every later call on the cache: the full column of every cached slot of a pruned layer
  (:func:`past_columns`), and the position shift of renumbered segments;
- **folded** after a generate whose only pruning happened before decoder layer 0 with renumbered
  positions: the cache is then exactly a pre-LLM shrink's, and the record becomes one (:func:`fold_layer0`);
- **refused** for a new call on a cache pruned before layer 0 that could not be folded
  (:func:`refuse_layer0`): transformers would count the past from layer 0's shorter length.

Coordinates: a *full column* is a position in the sequence the LLM received (after any pre-LLM shrink).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CacheRecord:
    """What vlmzip remembers about one KV cache object.

    - ``cols[layer]``: for the pruned segment starting at ``layer``, (B, S) long, the full column of every
      cached slot (-1 = masked padding);
    - ``shift[layer]``: (B,) for a segment whose positions were renumbered, old minus new position of the
      last token (later tokens continue the renumbered count);
    - ``full_len``: the full length when the pruned columns were recorded;
    - ``prompt``: (caller's prompt length, (B, L') long columns of the shrunk prompt in the caller's ids), or
      None.
    """

    cols: dict[int, torch.Tensor] = field(default_factory=dict)
    shift: dict[int, torch.Tensor] = field(default_factory=dict)
    full_len: int = 0
    prompt: tuple[int, torch.Tensor] | None = None


_RECORDS: weakref.WeakKeyDictionary[Any, CacheRecord] = weakref.WeakKeyDictionary()


def record_of(cache: Any, create: bool = False) -> CacheRecord | None:
    """The record of ``cache`` (a transformers Cache); with ``create``, a new empty one if it has none."""
    if cache is None:
        return None
    record = _RECORDS.get(cache)
    if record is None and create:
        record = _RECORDS[cache] = CacheRecord()
    return record


def note_pruned(cache: Any, layer: int, cols: torch.Tensor, full_len: int, shift: torch.Tensor | None) -> None:
    """A prefill pruned the segment starting at decoder ``layer``: remember its cached slots' columns
    (B, S), the full length, and the position shift when its positions were renumbered."""
    record = record_of(cache, create=True)
    assert record is not None
    record.cols[layer] = cols
    record.full_len = full_len
    if shift is not None:
        record.shift[layer] = shift


def full_length(cache: Any) -> int:
    """The full columns a cache stands for: its own length, or, for a cache pruned before decoder layer 0 (whose
    every layer holds only kept slots), the columns of the sequence the LLM received plus those added since."""
    if cache is None:
        return 0
    record = record_of(cache)
    if record is None or 0 not in record.cols:
        return int(cache.get_seq_length())
    return record.full_len + int(cache.get_seq_length(0)) - int(record.cols[0].shape[1])


def past_columns(cache: Any, start: int, past_full: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """(B, S) full columns of the slots the segment starting at ``start`` already caches before a call with
    ``past_full`` full columns of past (None when the cache is empty)."""
    if past_full == 0:
        return None
    record = record_of(cache)
    old = None if record is None else record.cols.get(start)
    if old is None:
        return torch.arange(past_full, device=device).expand(batch, -1)
    tail = torch.arange(record.full_len, past_full, device=device).expand(batch, -1)
    return torch.cat([old.to(device), tail], dim=1)


def _candidates(cache: Any, out: Any) -> Iterable[Any]:
    """The caches a generate call may have filled: the one passed, or the one it returns."""
    return (cache, getattr(out, "cache", None))


def remember_prompt(cache: Any, out: Any, prompt_len: int, columns: torch.Tensor) -> None:
    """After a compressed generate: note on its cache how the caller's prompt (``prompt_len`` ids) maps to the
    shrunk one (``columns``, (B, L') long), so a later turn's ids can be mapped onto it."""
    for candidate in _candidates(cache, out):
        if candidate is not None:
            record = record_of(candidate, create=True)
            assert record is not None
            record.prompt = (prompt_len, columns) if columns.shape[0] else None


def map_later_turn(cache: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """(B, L) long columns of a later turn's ids in the caller's coordinates of the cached conversation: the
    cached prompt's shrunk columns, then the new ids' own; None when ``ids`` do not continue a prompt the
    cache remembers (another batch size, or shorter than the prompt)."""
    record = record_of(cache)
    if record is None or record.prompt is None:
        return None
    prompt_len, columns = record.prompt
    if ids.shape[1] < prompt_len or ids.shape[0] != columns.shape[0]:
        return None
    tail = torch.arange(prompt_len, ids.shape[1]).expand(ids.shape[0], -1)
    return torch.cat([columns, tail], dim=1)


def fold_layer0(cache: Any, out: Any) -> None:
    """After a generate whose only in-LLM step acted before decoder layer 0 with renumbered positions
    (saliency on a 1-D RoPE LLM), the cache is exactly what dropping those tokens before the LLM gives: fold
    the kept columns into the prompt map, so a later turn maps onto it like a pre-LLM shrink's."""
    for candidate in _candidates(cache, out):
        record = record_of(candidate)
        if record is None or set(record.cols) != {0} or 0 not in record.shift or record.prompt is None:
            continue
        prompt_len, columns = record.prompt
        kept = record.cols[0].cpu()  # (B, S) LLM-input column of each cached prompt slot, -1 = padding
        record.prompt = (prompt_len, columns.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -1))
        record.cols.clear()
        record.shift.clear()


def refuse_layer0(cache: Any) -> None:
    """A clear error for a new call on a cache pruned before decoder layer 0: every layer's cache then holds
    only kept slots, and transformers would count the past from layer 0's (shorter) length."""
    record = record_of(cache)
    if record is not None and 0 in record.cols:
        raise ValueError(
            "this KV cache was pruned before decoder layer 0 (saliency, cluster_saliency_llm) by a forward call "
            "(or with kept M-RoPE positions, or with a later in-LLM stage): continuing a conversation on it is "
            "supported only after model.generate(...) on a 1-D RoPE LLM; run the whole conversation again "
            "without the cache, or use a method that prunes from layer 1 on (e.g. fastv)"
        )

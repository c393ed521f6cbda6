"""Pruning inside the LLM: forward hooks on one model instance's decoder layers.

An in-LLM stage acts before decoder layer K. Layer K-1's attention input, ``q_proj`` and ``k_proj``
outputs are captured with hooks (the model keeps SDPA: only the attention rows a method asks for are
rebuilt, from q/k after RoPE with GQA expanded and the layer's mask applied). Before layer K the
method says which visual tokens stay; from then on every later layer receives only the kept tokens:
hidden states, position embeddings (original positions, so gaps remain), position ids and an attention
mask gathered to the kept columns. Each later layer's KV cache therefore holds only kept tokens.
Decode steps run every layer in full on the new token; layers >= K attend through a mask gathered to
their cached columns, which vlmzip remembers per cache object (see :class:`CacheRecord`).

Coordinates: a *full column* is a position in the sequence the LLM received (after any pre-LLM
shrink). A pruned segment's tensors are indexed by slots; ``cols`` maps each slot to its full column
(-1 = padding added because rows kept different numbers of tokens; such slots are masked out).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .methods.base import LLMTokens, to_device

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class CacheRecord:
    """What vlmzip remembers about one KV cache object: for each pruned layer, the full column of every
    cached slot (``cols[layer]``: (B, S) long, -1 = masked padding), and the full length when recorded."""

    cols: dict[int, torch.Tensor] = field(default_factory=dict)
    full_len: int = 0
    prompt: Any = None  # set by runtime.py: how the caller's prompt maps to the shrunk one (multi-turn)


_RECORDS: weakref.WeakKeyDictionary[Any, CacheRecord] = weakref.WeakKeyDictionary()
_STEPS = threading.local()  # per thread: id(pruner) -> the StepState of the forward call in flight


def cache_record(cache: Any, create: bool = False) -> CacheRecord | None:
    """The record of ``cache`` (a transformers Cache); with ``create``, a new empty one if it has none."""
    if cache is None:
        return None
    record = _RECORDS.get(cache)
    if record is None and create:
        record = _RECORDS[cache] = CacheRecord()
    return record


@dataclass
class Segment:
    """The tensors every layer of one pruned segment receives in one forward call."""

    q_idx: torch.Tensor  # (B, Q) index of each query slot into this call's full-length queries
    cols: torch.Tensor  # (B, S) full column of each key slot (past and present), -1 = padding
    mask: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    position_ids: torch.Tensor | None


@dataclass
class PrefillPlan:
    """The visual tokens of one prefill in the LLM sequence, and each in-LLM stage's keep counts.

    ``visual``/``image``: (B, L) on the host; ``keeps[j][b][i]``: tokens image i of row b keeps at stage j.
    """

    visual: torch.Tensor
    image: torch.Tensor
    keeps: list[list[list[int]]]


@dataclass
class StepState:
    """Per forward call: the prefill plan (None for decode / text-only calls) and the segments built."""

    prefill: PrefillPlan | None
    segments: dict[int, Segment] = field(default_factory=dict)
    visual: torch.Tensor | None = None  # (B, Q) on the device, current slots
    image: torch.Tensor | None = None
    valid: list[int] | None = None  # real (non-padding) slots per row, host ints
    captured: dict[str, Any] = field(default_factory=dict)
    past_full: int = 0  # full columns already in the cache before this call
    call_len: int = 0  # full columns of this call
    full: tuple[Any, Any, Any] = (None, None, None)  # this call's mask, position embeddings, position ids


def _to_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def _from_bool(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def gather_mask(
    full: torch.Tensor | None,
    q_idx: torch.Tensor,
    q_cols: torch.Tensor,
    k_cols: torch.Tensor,
    kind: str,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The 4-D mask (B, 1, Q, S) of a pruned segment, from the call's full mask (or None = causal).

    ``q_idx`` (B, Q) indexes the full mask's query rows, ``q_cols``/``k_cols`` are full columns of the
    query/key slots (-1 = padding: keys masked, padding queries attend to every real key so no row is
    empty). Returns None when plain causal attention over the slots is already right.
    """
    batch, q_len = q_cols.shape
    k_valid = k_cols >= 0
    q_valid = q_cols >= 0
    # (cheap shape tests first: a decode step never reaches the host-syncing value tests)
    if full is None and q_len == k_cols.shape[1] and bool(k_valid.all()) and torch.equal(q_cols, k_cols):
        return None
    causal = k_cols.unsqueeze(1) <= q_cols.unsqueeze(2)  # (B, Q, S)
    allowed = causal & k_valid.unsqueeze(1)
    if full is not None:
        fb = _to_bool(full).expand(batch, -1, -1, -1)[:, 0]  # (B, Lq, Lk)
        rows = fb.gather(1, q_idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, fb.shape[-1]))
        picked = rows.gather(2, k_cols.clamp(min=0).unsqueeze(1).expand(-1, q_len, -1))
        allowed = allowed & picked
    allowed = torch.where(q_valid.unsqueeze(-1), allowed, k_valid.unsqueeze(1).expand(-1, q_len, -1))
    return _from_bool(allowed.unsqueeze(1), kind, dtype)


def gather_rows(t: torch.Tensor | None, q_idx: torch.Tensor, dim: int = 1) -> torch.Tensor | None:
    """Gather (B|1, L, ...) ``t`` at (B, Q) ``q_idx`` along ``dim`` (-1 slots take row 0's value)."""
    if t is None:
        return None
    batch = q_idx.shape[0]
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    idx = q_idx.clamp(min=0)
    if t.ndim > 2:
        idx = idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(*idx.shape, *t.shape[2:])
    return t.gather(dim, idx)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotate-half of standard RoPE: (..., Dh) -> (..., Dh)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) rotated by cos/sin (B, T, Dh) - the Llama / Qwen2 form (Qwen2-VL's M-RoPE arrives
    already recomposed to (B, T, Dh))."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    head_dim: int,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention probabilities of query ``rows`` (B, R) over all keys: (B, H, R, T), float32.

    ``q`` (B, T, H * Dh) and ``k`` (B, T, Hkv * Dh) are the projections' outputs (before RoPE); keys
    are rotated and repeated for GQA; ``mask`` is the layer's 4-D mask or None (causal).
    """
    batch, length, _ = q.shape
    cos, sin = (t.float().expand(batch, -1, -1) for t in position_embeddings)
    qh = q.float().view(batch, length, -1, head_dim)
    qh = qh.gather(1, rows.view(batch, -1, 1, 1).expand(-1, -1, qh.shape[2], head_dim)).transpose(1, 2)
    q_rot = apply_rope(qh, gather_rows(cos, rows), gather_rows(sin, rows))
    kh = k.float().view(batch, length, -1, head_dim).transpose(1, 2)
    k_rot = apply_rope(kh, cos, sin)
    groups = q_rot.shape[1] // k_rot.shape[1]
    k_rot = k_rot.repeat_interleave(groups, dim=1)
    scores = (q_rot @ k_rot.transpose(-1, -2)) * scaling  # (B, H, R, T)
    if mask is None:
        allowed = torch.arange(length, device=q.device).view(1, 1, -1) <= rows.unsqueeze(-1)
    else:
        fb = _to_bool(mask).expand(batch, -1, -1, -1)[:, 0]
        allowed = fb.gather(1, rows.unsqueeze(-1).expand(-1, -1, fb.shape[-1]))[..., -length:]
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


class _Capture:
    """Hooks on the signal layer: its attention's kwargs (pre-hook) and q_proj / k_proj outputs."""

    def __init__(self, pruner: Pruner, name: str) -> None:
        self.pruner, self.name = pruner, name

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> Any:
        step = self.pruner.step()
        if step is None or step.prefill is None:
            return None
        if self.name == "attn":
            kwargs = rest[0]
            step.captured["position_embeddings"] = kwargs.get("position_embeddings")
            step.captured["mask"] = kwargs.get("attention_mask")
        else:
            step.captured[self.name] = rest[0]
        return None


class _LayerPreHook:
    """Runs before decoder layer ``index``: prunes (at a stage's layer) and substitutes pruned inputs."""

    def __init__(self, pruner: Pruner, index: int) -> None:
        self.pruner, self.index = pruner, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        return self.pruner.before_layer(self.index, args, kwargs)


class Pruner:
    """The in-LLM machinery of one compressed model: its stages, hooks and per-call state.

    ``stages``: [(layer K, fn, resolved knobs)] in increasing K. ``step()`` returns the current call's
    :class:`StepState` (set by runtime.py around each forward).
    """

    def __init__(self, layers: nn.ModuleList, attn_kind: str, stages: list[tuple[int, Any, dict[str, Any]]]) -> None:
        if attn_kind not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"in-LLM methods need the LLM's attention to be one of {SUPPORTED_ATTENTION}, got {attn_kind!r}; "
                "load the model with attn_implementation='sdpa'"
            )
        self.layers = layers
        self.attn_kind = attn_kind
        self.stages = stages
        self.first = stages[0][0]
        self.handles: list[Any] = []

    @property
    def current(self) -> StepState | None:
        """This thread's forward call in flight (so two threads can share one compressed model)."""
        return getattr(_STEPS, "table", {}).get(id(self))

    @current.setter
    def current(self, step: StepState | None) -> None:
        table = _STEPS.__dict__.setdefault("table", {})
        if step is None:
            table.pop(id(self), None)
        else:
            table[id(self)] = step

    def step(self) -> StepState | None:
        return self.current

    def install(self) -> None:
        """Register the hooks on this instance's decoder layers (and the signal layers' projections)."""
        for k, _, _ in self.stages:
            attn = self.layers[k - 1].self_attn
            self.handles.append(attn.register_forward_pre_hook(_Capture(self, "attn"), with_kwargs=True))
            self.handles.append(attn.q_proj.register_forward_hook(_Capture(self, "q")))
            self.handles.append(attn.k_proj.register_forward_hook(_Capture(self, "k")))
        for index in range(self.first, len(self.layers)):
            self.handles.append(
                self.layers[index].register_forward_pre_hook(_LayerPreHook(self, index), with_kwargs=True)
            )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # -- the work done before a layer -------------------------------------------------------------

    def before_layer(self, index: int, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        step = self.current
        if step is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        stage = next((s for s in self.stages if s[0] == index), None)
        if stage is not None and step.prefill is not None:
            hidden = self._prune(step, stage, hidden, kwargs, cache)
        segment = self._segment(step, index, hidden, kwargs, cache)
        if segment is None:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = segment.mask
        if segment.position_embeddings is not None:
            kwargs["position_embeddings"] = segment.position_embeddings
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = segment.position_ids
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _segment_start(self, index: int) -> int:
        return max(k for k, _, _ in self.stages if k <= index)

    def _segment(
        self, step: StepState, index: int, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> Segment | None:
        """This call's inputs for the segment holding layer ``index`` (built once, reused by its layers)."""
        start = self._segment_start(index)
        if start in step.segments:
            return step.segments[start]
        record = cache_record(cache)
        if record is None or start not in record.cols:
            return None  # nothing pruned for this segment: the layer runs as in the vanilla model
        # a call after the pruning prefill (decode, or a later turn without images): new tokens all stay
        batch, q_len = hidden.shape[:2]
        full = kwargs.get("attention_mask")
        full_len = full.shape[-1] if full is not None else record_full_len(cache, q_len)
        device = hidden.device
        new = torch.arange(record.full_len, full_len, device=device).expand(batch, -1)
        cols = torch.cat([record.cols[start].to(device), new], dim=1)
        q_cols = torch.arange(full_len - q_len, full_len, device=device).expand(batch, -1)
        q_idx = torch.arange(q_len, device=device).expand(batch, -1)
        mask = gather_mask(full, q_idx, q_cols, cols, self.attn_kind, hidden.dtype)
        segment = Segment(q_idx, cols, mask, kwargs.get("position_embeddings"), kwargs.get("position_ids"))
        step.segments[start] = segment
        return segment

    def _prune(
        self, step: StepState, stage: tuple[int, Any, dict[str, Any]], hidden: torch.Tensor,
        kwargs: dict[str, Any], cache: Any,
    ) -> torch.Tensor:
        """Run the stage's method on the current tokens and build its segment; returns the kept hidden states."""
        layer, fn, knobs = stage
        plan = step.prefill
        assert plan is not None
        j = [s[0] for s in self.stages].index(layer)
        batch, cur_len, _ = hidden.shape
        device = hidden.device
        prev = step.segments.get(self._segment_start(layer - 1)) if layer > self.first else None
        if prev is None:  # the first stage of this call: slots = this call's full columns
            past = step.past_full
            cur_cols = torch.arange(past, past + cur_len, device=device).expand(batch, -1)
            cur_q_idx = torch.arange(cur_len, device=device).expand(batch, -1)
            step.visual = to_device(plan.visual, device)
            step.image = to_device(plan.image, device)
            step.valid = [cur_len] * batch
            step.call_len = cur_len
            step.full = (kwargs.get("attention_mask"), kwargs.get("position_embeddings"), kwargs.get("position_ids"))
        else:
            cur_q_idx = prev.q_idx
            cur_cols = prev.cols[:, -cur_len:]
        full_mask, full_pos_emb, full_pos_ids = step.full
        captured = step.captured
        attn = self.layers[layer - 1].self_attn

        def attention(rows: torch.Tensor) -> torch.Tensor:
            return attention_rows(
                captured["q"], captured["k"], rows, captured["position_embeddings"], captured["mask"],
                attn.head_dim, attn.scaling,
            )

        view = LLMTokens(hidden=hidden, visual=step.visual, image=step.image, keep=plan.keeps[j],
                         attention=attention, layer=layer)
        keep = fn(view, **knobs) & (cur_cols >= 0)
        entering = plan_visual_counts(plan, j)
        valid = [step.valid[b] - sum(entering[b]) + sum(plan.keeps[j][b]) for b in range(batch)]
        new_len = max(valid)
        order = keep.to(torch.int8).sort(dim=1, stable=True).indices[:, -new_len:]  # kept slots, in order, last
        n_pad = to_device([new_len - v for v in valid], device)
        pad = torch.arange(new_len, device=device).unsqueeze(0) < n_pad.unsqueeze(1)
        new_cols = cur_cols.gather(1, order).masked_fill(pad, -1)
        q_idx = cur_q_idx.gather(1, order)
        new_hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        new_hidden = new_hidden.masked_fill(pad.unsqueeze(-1), 0.0)

        record = cache_record(cache, create=cache is not None)
        past_cols = self._past_cols(record, layer, step.past_full, batch, device)
        k_cols = new_cols if past_cols is None else torch.cat([past_cols, new_cols], dim=1)
        if full_mask is None and past_cols is None and min(valid) == new_len:
            mask = None  # no padding anywhere, no past: plain causal attention over the kept slots is right
        else:
            mask = gather_mask(full_mask, q_idx, new_cols, k_cols, self.attn_kind, hidden.dtype)
        pos_emb = None if full_pos_emb is None else tuple(gather_rows(t, q_idx) for t in full_pos_emb)
        pos_ids = full_pos_ids
        if pos_ids is not None and pos_ids.shape[-1] == step.call_len:
            pos_ids = gather_rows(pos_ids, q_idx, dim=pos_ids.ndim - 1)
        step.segments[layer] = Segment(q_idx, k_cols, mask, pos_emb, pos_ids)
        step.visual = step.visual.gather(1, order) & ~pad
        step.image = step.image.gather(1, order).masked_fill(pad, -1)
        step.valid = valid
        if record is not None:
            record.cols[layer] = k_cols
            record.full_len = step.past_full + step.call_len
        return new_hidden

    def _past_cols(self, record: CacheRecord | None, layer: int, past_full: int, batch: int,
                   device: torch.device) -> torch.Tensor | None:
        """Full columns of the slots layer ``layer`` already caches (None when the cache is empty)."""
        if past_full == 0:
            return None
        old = None if record is None else record.cols.get(self._segment_start(layer))
        if old is None:
            return torch.arange(past_full, device=device).expand(batch, -1)
        tail = torch.arange(record.full_len, past_full, device=device).expand(batch, -1)
        return torch.cat([old.to(device), tail], dim=1)


def plan_visual_counts(plan: PrefillPlan, stage: int) -> list[list[int]]:
    """Visual tokens per row and image entering ``stage`` (the previous stage's keeps, or the LLM input)."""
    if stage > 0:
        return plan.keeps[stage - 1]
    counts: list[list[int]] = []
    for b in range(plan.image.shape[0]):
        row = plan.image[b]
        n = int(row.max()) + 1 if bool((row >= 0).any()) else 0
        counts.append([int((row == i).sum()) for i in range(n)])
    return counts


def record_full_len(cache: Any, q_len: int) -> int:
    """Full sequence length (past + this call) read off layer 0 of the cache (already updated this call)."""
    return int(cache.get_seq_length(0)) if cache is not None else q_len

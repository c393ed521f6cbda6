"""Pruning inside the LLM: forward hooks on one model instance's decoder layers.

An in-LLM stage acts before decoder layer K. Layer K-1's attention input and its queries and keys
(the ``q_proj`` / ``k_proj`` outputs, normalised per head where the attention does so before RoPE, as
Qwen3's and Gemma 3's do) are captured with hooks (the model keeps SDPA:
only the attention rows a method asks for are rebuilt, from q/k after RoPE with GQA expanded and the
layer's mask applied). Before layer K the method says which visual tokens stay; from then on every
later layer receives only the kept tokens:
hidden states, position embeddings (original positions, so gaps remain), position ids and an attention
mask gathered to the kept columns. Each later layer's KV cache therefore holds only kept tokens.
Decode steps run every layer in full on the new token; layers >= K attend through a mask gathered to
their cached columns, which vlmzip remembers per cache object (``vlmzip.kvcache``).

LLMs with sliding-window layers (Gemma 3: five local layers to one global) get, in each pruned segment, one
mask per layer type: a global layer attends as above; a sliding layer attends to the keys fewer than
``sliding_window`` *slots* before each query, i.e. the model's own window applied to the pruned sequence, which
is also what its cache keeps (a sliding cache layer holds the last ``sliding_window - 1`` slots). Each layer type
keeps its own rotary embeddings (Gemma 3's local and global RoPE differ), gathered per slot from what the model
gives that layer.

Coordinates: a *full column* is a position in the sequence the LLM received (after any pre-LLM
shrink). A pruned segment's tensors are indexed by slots; ``cols`` maps each slot to its full column
(-1 = padding added because rows kept different numbers of tokens; such slots are masked out).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import kvcache
from .methods.base import LLMSelection, LLMTokens, to_device

SUPPORTED_ATTENTION = ("sdpa", "eager")
FULL, SLIDING = "full_attention", "sliding_attention"  # the decoder layer types in-LLM pruning supports


@dataclass
class Segment:
    """The tensors every layer of one pruned segment receives in one forward call.

    ``mask`` is the global (full-attention) layers' mask; ``inputs[kind]`` caches, per layer type, the mask and
    position embeddings its layers get (built on first use by :meth:`Pruner._layer_inputs`).
    """

    q_idx: torch.Tensor  # (B, Q) index of each query slot into this call's full-length queries
    cols: torch.Tensor  # (B, S) full column of each key slot (past and present), -1 = padding
    mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    renumbered: bool = False  # positions come from ``position_ids`` through the rotary, not the model's own
    inputs: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class PrefillPlan:
    """The visual tokens of one prefill in the LLM sequence, and each in-LLM step's counts.

    ``visual``/``image``: (B, L) on the host; ``real``: (B, L) bool, False at the caller's padding (None =
    no padding); ``kept[j][b][i]`` / ``keeps[j][b][i]``: visual tokens image i of row b keeps at step j /
    has after step j (kept plus inserted).
    """

    visual: torch.Tensor
    image: torch.Tensor
    keeps: list[list[list[int]]]
    kept: list[list[list[int]]] | None = None
    real: torch.Tensor | None = None

    def kept_at(self, step: int) -> list[list[int]]:
        return self.keeps[step] if self.kept is None else self.kept[step]


@dataclass
class StepState:
    """Per forward call: the prefill plan (None for decode / text-only calls) and the segments built.

    The current slots (after the steps run so far) are described by ``visual`` / ``image`` (B, Q),
    ``sub`` (B, Q) long (0, or the insertion rank of a token inserted at its anchor's column) and ``pos_ids``
    (the positions each slot uses; with ``renumbered`` False each slot's rotary embeddings are the call's own
    at its query index).
    """

    prefill: PrefillPlan | None
    segments: dict[int, Segment] = field(default_factory=dict)
    visual: torch.Tensor | None = None  # (B, Q) on the device, current slots
    image: torch.Tensor | None = None
    sub: torch.Tensor | None = None
    pos_ids: torch.Tensor | None = None
    renumbered: bool = False
    valid: list[int] | None = None  # real (non-padding) slots per row, host ints
    captured: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, dict[str, Any]] = field(default_factory=dict)
    past_full: int = 0  # full columns already in the cache before this call
    call_len: int = 0  # full columns of this call
    full_mask: Any = None  # this call's global-layer mask over its full columns (None = causal)
    full_ids: torch.Tensor | None = None  # this call's position ids
    padding: torch.Tensor | None = None  # the caller's (B, full_len) 2-D attention mask, if any

    def current_slots(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After a pruning step of this call: (B, Q) index of each current slot into this call's LLM input, and
        (B, Q) bool, True where the slot holds a token of that input (not padding, not a token a method inserted);
        None before any pruning (the hidden states then hold the whole input)."""
        if not self.segments or self.sub is None:
            return None
        segment = list(self.segments.values())[-1]
        q_len = segment.q_idx.shape[1]
        return segment.q_idx, (segment.cols[:, -q_len:] >= 0) & (self.sub == 0)


SUB = 1 << 20  # causal order of a slot = column * SUB + sub (inserted tokens sort right after their anchor)


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
    q_rank: torch.Tensor | None = None,
    k_rank: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The 4-D mask (B, 1, Q, S) of a pruned segment, from the call's full mask (or None = causal).

    ``q_idx`` (B, Q) indexes the full mask's query rows, ``q_cols``/``k_cols`` are full columns of the
    query/key slots (-1 = padding: keys masked, padding queries attend to every real key so no row is
    empty). ``q_rank``/``k_rank`` (default: the columns) give the causal order where inserted tokens
    share their anchor's column. A full mask is followed as it is, attention to later columns included (Gemma 3's
    image tokens attend to each other both ways); slots of one column attend in causal order. Returns None when
    plain causal attention over the slots is already right.
    """
    batch, q_len = q_cols.shape
    k_valid = k_cols >= 0
    q_valid = q_cols >= 0
    # (cheap shape tests first: a decode step never reaches the host-syncing value tests)
    if (full is None and q_rank is None and q_len == k_cols.shape[1] and bool(k_valid.all())
            and torch.equal(q_cols, k_cols)):
        return None
    q_order = q_cols if q_rank is None else q_rank
    k_order = k_cols if k_rank is None else k_rank
    causal = k_order.unsqueeze(1) <= q_order.unsqueeze(2)  # (B, Q, S)
    if full is None:
        allowed = causal & k_valid.unsqueeze(1)
    else:
        fb = _to_bool(full).expand(batch, -1, -1, -1)[:, 0]  # (B, Lq, Lk)
        rows = fb.gather(1, q_idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, fb.shape[-1]))
        picked = rows.gather(2, k_cols.clamp(min=0).unsqueeze(1).expand(-1, q_len, -1))
        same = k_cols.unsqueeze(1) == q_cols.unsqueeze(2)
        allowed = picked & k_valid.unsqueeze(1) & (causal | ~same)
    allowed = torch.where(q_valid.unsqueeze(-1), allowed, k_valid.unsqueeze(1).expand(-1, q_len, -1))
    return _from_bool(allowed.unsqueeze(1), kind, dtype)


def slide(
    mask: torch.Tensor | None, past: int, q_len: int, window: int, kind: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """A sliding-window layer's mask in a pruned segment, from the segment's global mask (B, 1, Q, P + Q) over
    ``past`` (P) cached and ``q_len`` (Q) new slots (None = causal, only without past).

    The layer's cache holds only the last ``min(P, window - 1)`` past slots, so its keys are those plus the new
    ones: (B, 1, Q, min(P, window - 1) + Q); a query attends to the keys fewer than ``window`` slots before it,
    as the model's own window counts positions of the sequence it is given. None when plain causal is right.
    """
    cached = min(past, window - 1)
    total = cached + q_len
    if past + q_len <= window:  # no key is ``window`` or more slots before a query
        return None if mask is None else mask[..., -total:]
    q_slot = torch.arange(past, past + q_len, device=device).view(-1, 1)
    k_slot = torch.arange(past - cached, past + q_len, device=device).view(1, -1)
    in_window = k_slot > q_slot - window  # (Q, total)
    if mask is None:
        return _from_bool((in_window & (k_slot <= q_slot)).view(1, 1, q_len, total), kind, dtype)
    sliced = mask[..., -total:]
    if sliced.dtype == torch.bool:
        return sliced & in_window
    return sliced.masked_fill(~in_window, torch.finfo(sliced.dtype).min)


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


def attention_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    head_dim: int,
    scaling: float,
) -> torch.Tensor:
    """Scaled q.k scores of query ``rows`` (B, R) over all keys: (B, H, R, T), float32, masked = -inf.

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
    return scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))


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

    The same arguments as :func:`attention_logits`; fully masked rows (padding) come back as zeros.
    """
    scores = attention_logits(q, k, rows, position_embeddings, mask, head_dim, scaling)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def rope_ones(
    rows: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], scaling: float
) -> torch.Tensor:
    """(B, R, T): RoPE applied to all-ones queries (``rows``) and keys (every slot), dot product x ``scaling``.

    SparseVLM+'s attention gravity: the part of a q.k score that comes from the positions alone.
    """
    cos, sin = (t.float() for t in position_embeddings)
    batch = rows.shape[0]
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    ones_rot = cos + rotate_half(torch.ones_like(cos)) * sin  # (B, T, Dh): ones rotated at every slot
    return (gather_rows(ones_rot, rows) @ ones_rot.transpose(1, 2)) * scaling


def normed_qk(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention's queries / keys before RoPE from its ``q_proj`` / ``k_proj`` outputs, (B, L, H*Dh) /
    (B, L, Hkv*Dh): normalised per head where the attention has ``q_norm`` / ``k_norm`` (Qwen3, Gemma 3), which act
    on each head's last dimension whatever layout the model calls them in."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if not (isinstance(q_norm, nn.Module) and isinstance(k_norm, nn.Module)):
        return q, k
    return (q_norm(q.unflatten(-1, (-1, attn.head_dim))).flatten(2),
            k_norm(k.unflatten(-1, (-1, attn.head_dim))).flatten(2))


def layer_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries / keys before RoPE, (B, L, H*Dh) / (B, L, Hkv*Dh), decoder ``layer`` computes from ``hidden``."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    return normed_qk(attn, attn.q_proj(normed), attn.k_proj(normed))


class _Capture:
    """Hooks on a signal layer: its attention's kwargs (pre-hook) and its ``q_proj`` / ``k_proj`` outputs
    ((B, L, H*Dh); :func:`normed_qk` turns them into the queries / keys before RoPE); or, with name "inputs", the
    LLM's input embeddings (pre-hook on decoder layer 0); or, with name "masks", the per-layer-type masks an LLM
    with sliding-window layers is given (pre-hook on the LLM; Gemma 3's model builds them and passes a dict)."""

    def __init__(self, pruner: Pruner, name: str) -> None:
        self.pruner, self.name = pruner, name

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> Any:
        step = self.pruner.step()
        if step is None or step.prefill is None:
            return None
        if self.name == "inputs":
            step.captured["inputs"] = args[0] if args else rest[0]["hidden_states"]
        elif self.name == "masks":
            masks = rest[0].get("attention_mask")
            step.captured["masks"] = masks if isinstance(masks, dict) else None
        elif self.name == "attn":
            kwargs = rest[0]
            step.captured["position_embeddings"] = kwargs.get("position_embeddings")
            step.captured["mask"] = kwargs.get("attention_mask")
        else:
            step.captured[self.name] = rest[0]
        return None


class _LayerPreHook:
    """Runs before decoder layer ``index``: prunes (at a step's layer) and substitutes pruned inputs."""

    def __init__(self, pruner: Pruner, index: int) -> None:
        self.pruner, self.index = pruner, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        return self.pruner.before_layer(self.index, args, kwargs)


def gather_last(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """Position ids (..., B|1, L) gathered along the last dim at (B, Q) ``idx`` -> (..., B, Q)."""
    if t is None:
        return None
    lead = t.shape[:-2]
    t = t.expand(*lead, idx.shape[0], t.shape[-1])
    return t.gather(-1, idx.clamp(min=0).expand(*lead, *idx.shape))


@dataclass
class _Slots:
    """The slots after one pruning step, in the coordinates of the slots before it.

    ``order``: (B, N) each new slot's candidate (a current slot, or ``cur_len + m`` for inserted token m);
    ``src``: (B, N) the current slot it comes from (an inserted token: its anchor); ``is_extra``, ``pad``:
    (B, N) bool; ``cols`` / ``q_idx``: (B, N) its full column / query index, filled by ``Pruner._gather``.
    """

    order: torch.Tensor
    src: torch.Tensor
    is_extra: torch.Tensor
    pad: torch.Tensor
    cur_len: int
    cols: torch.Tensor | None = None
    q_idx: torch.Tensor | None = None


def _extra_count(selection: LLMSelection) -> int:
    """How many tokens an in-LLM selection inserts per row (0 without any)."""
    if selection.extra is None or selection.extra_image is None:
        return 0
    return int(selection.extra.shape[1])


class Pruner:
    """The in-LLM machinery of one compressed model: its steps and hooks.

    ``steps``: :class:`~vlmzip.methods.base.LLMStep` in increasing layer order. ``rotary``: the LLM's
    rotary embedding module (needed by steps that renumber positions). ``state``: the compression it
    belongs to; ``state.current_step()`` is the :class:`StepState` of this model's forward in flight on this
    thread (runtime.py creates one around each forward), so two threads can share one compressed model.
    ``layer_types``: each decoder layer's type (``FULL`` or ``SLIDING``; None = all global) and ``window`` the
    sliding layers' window; ``lm``: the LLM module, whose per-type masks are captured when it has sliding layers.
    """

    def __init__(
        self, state: Any, layers: nn.ModuleList, attn_kind: str, steps: list[Any], rotary: nn.Module | None = None,
        layer_types: Sequence[str] | None = None, window: int | None = None, lm: nn.Module | None = None,
    ) -> None:
        if attn_kind not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"in-LLM methods need the LLM's attention to be one of {SUPPORTED_ATTENTION}, got {attn_kind!r}; "
                "load the model with attn_implementation='sdpa'"
            )
        self.state = state
        self.layers = layers
        self.attn_kind = attn_kind
        self.steps = steps
        self.rotary = rotary
        self.kinds = list(layer_types) if layer_types else [FULL] * len(layers)
        self.sliding = SLIDING in self.kinds
        if self.sliding and (not isinstance(window, int) or window < 1):
            raise ValueError(f"an LLM with sliding-window layers needs a positive sliding_window, got {window!r}")
        self.window = window or 0
        self.lm = lm
        # Gemma 3's rotary takes the layer type (its local and global layers use different RoPE bases)
        self.rotary_by_kind = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        self.first = steps[0].layer
        self.handles: list[Any] = []

    def step(self) -> StepState | None:
        """The state of this model's forward in flight on this thread (None outside one)."""
        return self.state.current_step()

    def install(self) -> None:
        """Register the hooks on this instance's decoder layers (and the signal layers' projections)."""
        if self.sliding and self.lm is not None:
            self.handles.append(self.lm.register_forward_pre_hook(_Capture(self, "masks"), with_kwargs=True))
        if any("inputs_embeds" in s.needs for s in self.steps):
            self.handles.append(self.layers[0].register_forward_pre_hook(_Capture(self, "inputs"), with_kwargs=True))
        for k in sorted({s.layer for s in self.steps if s.layer > 0}):
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
        """Prune (at a step's layer) and give layer ``index`` the pruned segment's inputs (hidden states, mask,
        positions); None leaves its inputs as they are."""
        step = self.step()
        if step is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        j = next((i for i, s in enumerate(self.steps) if s.layer == index), None)
        if j is not None and step.prefill is not None:
            hidden = self._prune(step, j, hidden, kwargs, cache)
        segment = self._segment(step, index, hidden, kwargs, cache)
        if segment is None:
            return None
        mask, position_embeddings = self._layer_inputs(segment, self.kinds[index], hidden, kwargs)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = segment.position_ids
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _segment_start(self, index: int) -> int:
        return max(s.layer for s in self.steps if s.layer <= index)

    def _layer_inputs(self, segment: Segment, kind: str, hidden: torch.Tensor,
                      kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """The mask and position embeddings the layers of type ``kind`` get in ``segment`` (built once per type):
        the segment's mask (a sliding layer's windowed over its slots, :func:`slide`), and the rotary embeddings of
        the slots' positions for that type (the model's own for this layer, gathered per slot, or, renumbered,
        recomputed from the position ids)."""
        if kind not in segment.inputs:
            mask = segment.mask
            if kind == SLIDING:
                q_len = segment.q_idx.shape[1]
                mask = slide(mask, segment.cols.shape[1] - q_len, q_len, self.window, self.attn_kind, hidden.dtype,
                             hidden.device)
            embeddings = self._embeddings(segment.renumbered, segment.position_ids, segment.q_idx, kind, hidden,
                                          kwargs)
            segment.inputs[kind] = (mask, embeddings)
        return segment.inputs[kind]

    def _embeddings(self, renumbered: bool, pos_ids: torch.Tensor | None, q_idx: torch.Tensor, kind: str,
                    hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin), each (B, Q, Dh), of slots at query indices ``q_idx`` (B, Q) for a layer of type ``kind``
        whose own inputs are ``kwargs``: recomputed from ``pos_ids`` when ``renumbered``, else the model's own
        embeddings for this layer gathered per slot (None when the model passes none)."""
        if renumbered:
            return self._rope(hidden, pos_ids, kind)
        own = kwargs.get("position_embeddings")
        return None if own is None else tuple(gather_rows(t, q_idx) for t in own)

    def _rope(self, hidden: torch.Tensor, pos_ids: torch.Tensor | None, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM rotary's (cos, sin) for ``pos_ids`` (B, Q) at a layer of type ``kind``."""
        assert self.rotary is not None and pos_ids is not None
        return self.rotary(hidden, pos_ids, kind) if self.rotary_by_kind else self.rotary(hidden, pos_ids)

    def _segment(
        self, step: StepState, index: int, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> Segment | None:
        """This call's inputs for the segment holding layer ``index`` (built once, reused by its layers)."""
        start = self._segment_start(index)
        if start in step.segments:
            return step.segments[start]
        record = kvcache.record_of(cache)
        if record is None or start not in record.cols:
            return None  # nothing pruned for this segment: the layer runs as in the vanilla model
        # a call after the pruning prefill (decode, or a later turn without images): new tokens all stay
        batch, q_len = hidden.shape[:2]
        full = kwargs.get("attention_mask")
        full_len = full.shape[-1] if full is not None else int(cache.get_seq_length(0))  # layer 0: updated already
        device = hidden.device
        if start == 0 or self.sliding:
            # the LLM's own masks are not over full columns: with layer 0 pruned its cache holds only kept slots;
            # with sliding layers the model sizes its global mask by its first global layer's (pruned) cache and
            # its sliding mask by the window. This call's tokens are text: causal attention and the caller's padding
            full_len = kvcache.full_length(cache) + (q_len if start == 0 else 0)
            full = padding_mask(step.padding, full_len, q_len, device)
        new = torch.arange(record.full_len, full_len, device=device).expand(batch, -1)
        cols = torch.cat([record.cols[start].to(device), new], dim=1)
        q_cols = torch.arange(full_len - q_len, full_len, device=device).expand(batch, -1)
        q_idx = torch.arange(q_len, device=device).expand(batch, -1)
        mask = gather_mask(full, q_idx, q_cols, cols, self.attn_kind, hidden.dtype)
        pos_ids = kwargs.get("position_ids")
        shift = record.shift.get(start)
        if shift is not None:  # renumbered positions: the new tokens continue the kept tokens' count
            pos_ids = self._call_positions(pos_ids, kwargs, batch, q_len, full_len, device)
            pos_ids = pos_ids - shift.to(device).unsqueeze(1)
        segment = Segment(q_idx, cols, mask, pos_ids, renumbered=shift is not None)
        step.segments[start] = segment
        return segment

    @staticmethod
    def _call_positions(pos_ids: torch.Tensor | None, kwargs: dict[str, Any], batch: int, q_len: int,
                        full_len: int, device: torch.device) -> torch.Tensor:
        """This call's (B, Q) 1-D position ids (the layer's, or counted from the cache when absent)."""
        if pos_ids is None:
            pos_ids = torch.arange(full_len - q_len, full_len, device=device).unsqueeze(0)
        if pos_ids.ndim != 2:
            raise ValueError("renumbered positions need 1-D position ids (this LLM uses multi-axis RoPE)")
        return pos_ids.expand(batch, -1)

    def _start_call(self, step: StepState, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any],
                    cache: Any) -> None:
        """Describe this call's full sequence as the current slots (before the first step acts, at ``layer``)."""
        plan = step.prefill
        assert plan is not None
        batch, cur_len, _ = hidden.shape
        device = hidden.device
        step.visual = to_device(plan.visual, device)
        step.image = to_device(plan.image, device)
        step.sub = torch.zeros(batch, cur_len, dtype=torch.long, device=device)
        step.valid = [cur_len] * batch
        step.call_len = cur_len
        step.full_mask = self._call_mask(step, layer, kwargs, cache, device)
        pos_ids = kwargs.get("position_ids")
        step.full_ids = pos_ids
        step.pos_ids = pos_ids if pos_ids is not None and pos_ids.shape[-1] == cur_len else None

    def _call_mask(self, step: StepState, layer: int, kwargs: dict[str, Any], cache: Any,
                   device: torch.device) -> Any:
        """This call's global-layer mask over its full columns (None = causal): the one ``layer`` is given, or, on
        an LLM with sliding-window layers, the global one of the masks the LLM was given (else causal attention
        with the caller's padding)."""
        if not self.sliding:
            return kwargs.get("attention_mask")
        record = kvcache.record_of(cache)
        if step.past_full and record is not None and record.cols:
            raise ValueError(
                "this KV cache was pruned inside an LLM with sliding-window layers; a later call with new images "
                "cannot continue it (the model's masks for it are no longer over the whole sequence): send the "
                "images in the first call, or run the conversation again without the cache"
            )
        masks = step.captured.get("masks")
        if isinstance(masks, dict) and FULL in masks:
            return masks[FULL]
        if self.kinds[layer] == FULL:
            return kwargs.get("attention_mask")
        return padding_mask(step.padding, step.past_full + step.call_len, step.call_len, device)

    def _view(self, step: StepState, j: int, hidden: torch.Tensor, cur_cols: torch.Tensor, cur_q_idx: torch.Tensor,
              kwargs: dict[str, Any]) -> LLMTokens:
        """The :class:`LLMTokens` step ``j`` sees."""
        spec = self.steps[j]
        layer, plan, captured = spec.layer, step.prefill, step.captured
        assert plan is not None
        device = hidden.device

        def attention(rows: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                raise ValueError("a step before decoder layer 0 has no previous layer's attention; use logits(rows)")
            attn = self.layers[layer - 1].self_attn
            q, k = normed_qk(attn, captured["q"], captured["k"])
            return attention_rows(q, k, rows, captured["position_embeddings"],
                                  captured["mask"], attn.head_dim, attn.scaling)

        def logits(rows: torch.Tensor) -> torch.Tensor:
            own = self.layers[layer]
            q, k = layer_qk(own, hidden)
            mask, embeddings = self._current_inputs(step, layer, hidden, cur_q_idx, kwargs)
            return attention_logits(q, k, rows, embeddings, mask, own.self_attn.head_dim, own.self_attn.scaling)

        def gravity(rows: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                raise ValueError("a step before decoder layer 0 has no previous layer")
            return rope_ones(rows, captured["position_embeddings"], self.layers[layer - 1].self_attn.scaling)

        real = cur_cols >= 0
        call_cols = torch.where(real, cur_cols - step.past_full, -1)  # columns of this call's sequence
        if plan.real is not None:
            full_real = to_device(plan.real, device)
            real = real & full_real.gather(1, call_cols.clamp(min=0))
        inputs = captured.get("inputs")
        inputs_visual = inputs_real = None
        if inputs is not None:
            inputs_visual = to_device(plan.visual, device)
            inputs_real = (torch.ones_like(inputs_visual) if plan.real is None else to_device(plan.real, device))
        return LLMTokens(
            hidden=hidden, visual=step.visual, image=step.image, keep=plan.kept_at(j), attention=attention,
            layer=layer, logits=logits, rope_ones=gravity, cols=call_cols, real=real, inputs_embeds=inputs,
            inputs_visual=inputs_visual, inputs_real=inputs_real,
            scratch=step.scratch.setdefault(spec.group, {}),
        )

    def _current_inputs(self, step: StepState, layer: int, hidden: torch.Tensor, q_idx: torch.Tensor,
                        kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """The mask and rotary embeddings the current slots (query indices ``q_idx``, (B, Q)) attend with at
        ``layer``: the layer's own before the call's first step, else its type's in the latest segment."""
        built = list(step.segments.values())
        if built:
            return self._layer_inputs(built[-1], self.kinds[layer], hidden, kwargs)
        return kwargs.get("attention_mask"), self._embeddings(step.renumbered, step.pos_ids, q_idx, self.kinds[layer],
                                                              hidden, kwargs)

    def _prune(self, step: StepState, j: int, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any) -> torch.Tensor:
        """Run step ``j``'s method on the current tokens and build its segment; returns the new hidden states."""
        layer = self.steps[j].layer
        cur_cols, cur_q_idx = self._current_slots(step, layer, hidden, kwargs, cache)
        out = self.steps[j].fn(self._view(step, j, hidden, cur_cols, cur_q_idx, kwargs), **self.steps[j].knobs)
        selection = out if isinstance(out, LLMSelection) else LLMSelection(keep=out)
        valid = self._checked_counts(step, j, selection, cur_cols)
        slots = self._slot_order(step, selection, cur_cols, valid)
        new_hidden = self._gather(step, j, hidden, selection, slots, cur_cols, cur_q_idx)
        self._positions(step, j, slots)
        self._build_segment(step, layer, hidden, slots, valid, cache)
        return new_hidden

    def _current_slots(self, step: StepState, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any],
                       cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) full columns and query indices of the slots entering ``layer``: this call's full sequence at
        the first step of the call, else the previous step's segment."""
        batch, cur_len, _ = hidden.shape
        prev = step.segments.get(self._segment_start(layer - 1)) if layer > self.first else None
        if prev is not None:
            return prev.cols[:, -cur_len:], prev.q_idx
        self._start_call(step, layer, hidden, kwargs, cache)
        device = hidden.device
        cur_cols = torch.arange(step.past_full, step.past_full + cur_len, device=device).expand(batch, -1)
        return cur_cols, torch.arange(cur_len, device=device).expand(batch, -1)

    def _checked_counts(self, step: StepState, j: int, selection: LLMSelection, cur_cols: torch.Tensor) -> list[int]:
        """The real slots each row has after step ``j``, as the prefill plan says; an error when the method's
        selection (kept + inserted tokens) does not match it."""
        plan = step.prefill
        assert plan is not None
        keep = selection.keep & (cur_cols >= 0)
        entering = plan_visual_counts(plan, j)
        batch = keep.shape[0]
        valid = [step.valid[b] - sum(entering[b]) + sum(plan.keeps[j][b]) for b in range(batch)]
        inserted = 0 if _extra_count(selection) == 0 else (selection.extra_image >= 0).sum(dim=1)
        got = (keep.sum(dim=1) + inserted).tolist()
        if got != valid:
            spec = self.steps[j]
            raise RuntimeError(
                f"the in-LLM step of {spec.group!r} before layer {spec.layer} left {got} tokens per row; "
                f"its plan says {valid}"
            )
        return valid

    @staticmethod
    def _slot_order(step: StepState, selection: LLMSelection, cur_cols: torch.Tensor, valid: list[int]) -> _Slots:
        """Order every candidate (current slots, then inserted tokens) by where it goes, dropped ones first, and
        keep the last ``max(valid)`` per row: the new slots, left padded."""
        keep = selection.keep & (cur_cols >= 0)
        batch, cur_len = keep.shape
        device = keep.device
        n_extra = _extra_count(selection)
        new_len = max(valid)
        slot = torch.arange(cur_len, device=device).expand(batch, -1)
        key = torch.where(keep, slot * (n_extra + 1), -1)
        sources = slot
        if n_extra:
            extra_image = selection.extra_image
            images = max(int(step.image.max()), int(extra_image.max())) + 1  # every image of the batch, >= 1
            last = torch.full((batch, max(images, 1)), -1, dtype=torch.long, device=device)
            img = step.image.clamp(min=0)
            last = last.scatter_reduce(1, img, torch.where(step.image >= 0, slot, -1), reduce="amax")
            anchor = last.gather(1, extra_image.clamp(min=0))  # (B, M) slot each extra token follows
            rank = torch.arange(n_extra, device=device).expand(batch, -1)
            extra_key = torch.where(extra_image >= 0, anchor * (n_extra + 1) + 1 + rank, -1)
            key = torch.cat([key, extra_key], dim=1)
            sources = torch.cat([slot, anchor], dim=1)  # an extra token takes its anchor's column / position
        order = key.sort(dim=1, stable=True).indices[:, -new_len:]
        n_pad = to_device([new_len - v for v in valid], device)
        pad = torch.arange(new_len, device=device).unsqueeze(0) < n_pad.unsqueeze(1)
        return _Slots(order=order, src=sources.gather(1, order), is_extra=order >= cur_len, pad=pad, cur_len=cur_len)

    def _gather(self, step: StepState, j: int, hidden: torch.Tensor, selection: LLMSelection, slots: _Slots,
                cur_cols: torch.Tensor, cur_q_idx: torch.Tensor) -> torch.Tensor:
        """The new slots' hidden states (inserted tokens from the selection, padding zeroed), and their columns,
        query indices, insertion ranks, visual and image marks (into ``slots`` and ``step``)."""
        src, pad, is_extra, order = slots.src, slots.pad, slots.is_extra, slots.order
        slots.cols = cur_cols.gather(1, src).masked_fill(pad, -1)
        slots.q_idx = cur_q_idx.gather(1, src)
        new_hidden = hidden.gather(1, src.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        extra_idx = (order - slots.cur_len).clamp(min=0)
        if _extra_count(selection):
            extra = selection.extra.to(hidden.dtype).gather(1, extra_idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            new_hidden = torch.where(is_extra.unsqueeze(-1), extra, new_hidden)
        new_hidden = new_hidden.masked_fill(pad.unsqueeze(-1), 0.0)
        base_sub = step.sub.gather(1, src)
        step.sub = torch.where(is_extra, (j + 1) * (SUB // 64) + (order - slots.cur_len), base_sub).masked_fill(pad, 0)
        step.visual = (step.visual.gather(1, src) | is_extra) & ~pad
        new_image = step.image.gather(1, src)
        if _extra_count(selection):
            new_image = torch.where(is_extra, selection.extra_image.gather(1, extra_idx), new_image)
        step.image = new_image.masked_fill(pad, -1)
        return new_hidden

    def _positions(self, step: StepState, j: int, slots: _Slots) -> None:
        """The new slots' positions: kept as they were (an inserted token takes its anchor's), or renumbered
        contiguously (the step's ``positions``)."""
        src = slots.src
        pos_ids = gather_last(step.pos_ids, src) if step.pos_ids is not None else step.full_ids
        positions = self.steps[j].positions
        if positions == "renumber" or (positions == "auto" and self._can_renumber(pos_ids)):
            pos_ids = self._renumber(step, pos_ids, slots.cols)
        step.pos_ids = pos_ids

    def _build_segment(self, step: StepState, layer: int, hidden: torch.Tensor, slots: _Slots, valid: list[int],
                       cache: Any) -> None:
        """The segment every layer from ``layer`` on receives (keys = cached past + new slots, its mask), and the
        cache record of the pruned layers' slots."""
        batch = hidden.shape[0]
        new_cols = slots.cols
        past_cols = kvcache.past_columns(cache, layer, step.past_full, batch, hidden.device)
        k_cols = new_cols if past_cols is None else torch.cat([past_cols, new_cols], dim=1)
        q_rank = new_cols * SUB + step.sub
        k_rank = q_rank if past_cols is None else torch.cat([past_cols * SUB, q_rank], dim=1)
        full_mask = step.full_mask
        if full_mask is None and past_cols is None and min(valid) == max(valid):
            mask = None  # no padding anywhere, no past: plain causal attention over the kept slots is right
        else:
            mask = gather_mask(full_mask, slots.q_idx, new_cols, k_cols, self.attn_kind, hidden.dtype, q_rank, k_rank)
        step.segments[layer] = Segment(slots.q_idx, k_cols, mask, step.pos_ids, renumbered=step.renumbered)
        step.valid = valid
        if cache is not None:
            shift = self._shift(step, step.pos_ids) if step.renumbered else None
            kvcache.note_pruned(cache, layer, k_cols, step.past_full + step.call_len, shift)

    def _can_renumber(self, pos_ids: torch.Tensor | None) -> bool:
        """Whether this LLM has 1-D positions to renumber ("auto" keeps multi-axis M-RoPE positions)."""
        return pos_ids is not None and pos_ids.ndim == 2 and self.rotary is not None

    def _renumber(self, step: StepState, pos_ids: torch.Tensor | None, new_cols: torch.Tensor) -> torch.Tensor:
        """Contiguous (B, N) positions for the new slots, as transformers numbers a sequence without the dropped
        tokens: each row's first real token keeps its position, the next real ones count up from it, padding
        (the caller's, or added here) gets 0. Each layer type's rotary turns them into embeddings."""
        if pos_ids is None or pos_ids.ndim != 2 or self.rotary is None:
            raise ValueError(
                "renumbering positions needs an LLM with 1-D RoPE position ids (LLaVA, LLaVA-NeXT); this LLM "
                "uses multi-axis positions: pass keep_positions=True"
            )
        real = new_cols >= 0
        plan = step.prefill
        if plan is not None and plan.real is not None:
            call_cols = (new_cols - step.past_full).clamp(min=0)
            real = real & to_device(plan.real, new_cols.device).gather(1, call_cols)
        first = real.to(torch.int8).argmax(dim=1, keepdim=True)  # the first real slot of each row
        base = pos_ids.gather(1, first)
        counted = real.long().cumsum(dim=1) - 1
        new_ids = torch.where(real, base + counted, torch.zeros_like(base))
        step.renumbered = True
        return new_ids

    def _shift(self, step: StepState, pos_ids: torch.Tensor | None) -> torch.Tensor:
        """(B,) how far later tokens' positions move: the call's last position minus its new one."""
        full_ids = step.full_ids
        assert pos_ids is not None and full_ids is not None
        old_last = full_ids.expand(pos_ids.shape[0], -1)[:, -1]
        return old_last - pos_ids[:, -1]


def plan_visual_counts(plan: PrefillPlan, stage: int) -> list[list[int]]:
    """Visual tokens per row and image entering ``stage`` (the previous step's counts, or the LLM input)."""
    if stage > 0:
        return plan.keeps[stage - 1]
    counts: list[list[int]] = []
    for b in range(plan.image.shape[0]):
        row = plan.image[b]
        n = int(row.max()) + 1 if bool((row >= 0).any()) else 0
        counts.append([int((row == i).sum()) for i in range(n)])
    return counts


def padding_mask(padding: torch.Tensor | None, full_len: int, q_len: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1, Q, full_len) bool causal mask of a call's last ``q_len`` columns from the caller's (B, full_len)
    2-D attention mask (None: no padding, plain causal)."""
    if padding is None or padding.ndim != 2 or padding.shape[-1] != full_len:
        return None
    cols = torch.arange(full_len, device=device)
    causal = cols.view(1, -1) <= cols[full_len - q_len :].view(-1, 1)  # (Q, full_len)
    return (padding.to(device).bool()[:, None, None, :] & causal).contiguous()

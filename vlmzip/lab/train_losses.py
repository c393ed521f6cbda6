"""What one training update minimises: the answer loss, the dense auxiliary loss, the attention loss and, in
a continuation with ``distill``, the distillation anchor (plus ``eager_attention``, the switch the attention
loss needs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlmzip.lab.train_data import IGNORE_INDEX, Batch, pixel_values
from vlmzip.lab.train_mix import merge_slots, plan_slots, slot_named, slot_targets


def eager_attention(model: LlavaForConditionalGeneration) -> Callable[[], None]:
    """Switch the LM to eager attention, the only kind that returns its weights (which attention
    supervision reads); returns the function that switches it back.

    All layers switch together: the causal mask is built once per forward for the model's kind, so one
    eager layer among sdpa layers would get a mask it misreads and attend to future tokens.
    """
    config = model.model.language_model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"

    def restore() -> None:
        config._attn_implementation = before

    return restore


def mixed_image_tokens(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image tokens of a mixture-augmented batch (``batch.mix``): (tokens (N, D) of all rows, row-major
    like the placeholder slots; dense targets (N, 2); named (Q, N) bool, the tokens each supervised answer
    should attend to, as positions among all N tokens).

    Runs the vision tower once with the feature layer's CLS attention and keys (the adapter's own capture,
    as VisionZip gets them), builds each row's slots (``train_mix.plan_slots``) and merges the CLS + patch
    features before or after the projector as its plan says.
    """
    from vlmzip.adapters import adapter_for

    adapter = adapter_for(model)
    grid = adapter.layout.grid[0]
    vt = adapter.tower.run(pixel_values(batch.pixels.to(device), processor), adapter.layout,
                              frozenset({"cls_attention", "keys"}))
    hidden = vt.hidden  # (B, 1 + n, Dv): CLS first
    projector = model.model.multi_modal_projector
    projected = projector(hidden)
    tokens, targets, named_rows = [], [], []
    offset = 0
    assert batch.mix is not None and vt.cls_attention is not None and vt.keys is not None
    for row, plan in enumerate(batch.mix):
        slots = plan_slots(plan, vt.cls_attention[row, 1:], vt.keys[row, 1:], grid, projected[row, 1:])
        k = plan.tokens
        if plan.after_projector:
            tokens.append(merge_slots(projected[row], slots, k))
        else:
            tokens.append(projector(merge_slots(hidden[row], slots, k)))
        targets.append(slot_targets(slots, batch.patch_targets[row], k))
        mine = (batch.attn_rows == row).nonzero().squeeze(1)
        named = slot_named(slots, batch.attn_patches[mine], k)
        named_rows.append((mine, offset, named))
        offset += k
    named_all = torch.zeros(len(batch.attn_rows), offset, dtype=torch.bool)
    for mine, start, named in named_rows:
        named_all[mine, start : start + named.shape[1]] = named
    return torch.cat(tokens), torch.cat(targets).to(device), named_all.to(device)


def full_rows(batch: Batch) -> torch.Tensor:
    """(B,) bool: the rows whose image reaches the LM whole (every patch, in order, no CLS), as in a stock
    forward: no token-count augmentation, or the mixture's ``"full"`` plan."""
    if batch.mix is not None:
        return torch.tensor([plan.mode == "full" for plan in batch.mix], dtype=torch.bool)
    return batch.keep.all(1)


def distill_loss(
    logits: torch.Tensor,
    teacher: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    batch: Batch,
    device: torch.device,
) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at the answer tokens of the full-image rows
    (``full_rows``), mean over those tokens; 0 when the batch has none. ``logits``: the student's (B, T, V)
    on ``batch``; the teacher (frozen) runs the stock forward on the same rows' ids and pixels."""
    rows = full_rows(batch).to(device)
    labels = batch.labels.to(device)[rows, 1:]
    answer = labels != IGNORE_INDEX  # (R, T-1): positions that predict an answer token
    if not answer.any():
        return logits.new_zeros(())
    with torch.no_grad():
        teacher_logits = teacher(
            input_ids=batch.input_ids.to(device)[rows],
            pixel_values=pixel_values(batch.pixels.to(device)[rows], processor),
            attention_mask=batch.attention_mask.to(device)[rows],
        ).logits.float()
    target = torch.log_softmax(teacher_logits[:, :-1][answer], dim=-1)  # (A, V)
    student = torch.log_softmax(logits[rows, :-1][answer], dim=-1)
    return (target.exp() * (target - student)).sum(-1).mean()


def losses(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    batch: Batch,
    device: torch.device,
    attn_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, dense auxiliary loss, attention loss) of one batch: ``loss_terms`` without a teacher."""
    answer, aux, attn, _ = loss_terms(model, processor, batch, device, attn_layer)
    return answer, aux, attn


def lm_image_tokens(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What fills the batch's image placeholders: (tokens (N, D), dense targets (N, 2), named (Q, N) bool or
    None), N the placeholders of all rows, row-major.

    Plain batch: the projected features of each image's kept patches (``batch.keep``; all of them: exactly
    the stock ``model(input_ids, pixel_values)`` forward), their ``batch.patch_targets``, and None (the
    attention targets are ``batch.attn_patches``). Mixture-augmented batch (``batch.mix``):
    ``mixed_image_tokens``, whose named (Q, N) marks the tokens each supervised answer should attend to.
    """
    if batch.mix is not None:
        return mixed_image_tokens(model, processor, batch, device)
    keep = batch.keep.to(device)  # (B, n_patches)
    features = model.model.get_image_features(
        pixel_values(batch.pixels.to(device), processor),
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output  # B x (n_patches, D)
    kept = torch.stack(list(features))[keep]  # (kept patches of all rows, D), row-major like the slots
    return kept, batch.patch_targets.to(device)[keep], None


def forward_capturing_attention(
    model: LlavaForConditionalGeneration,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    attn_layer: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits (B, T, V) in float32, attention weights (B, H, T, T) of LM layer ``attn_layer`` or None) of
    the forward on ``embeds`` (B, T, D) and ``attention_mask`` (B, T).

    With ``attn_layer`` the LM must run eager attention (``eager_attention``), the only kind that returns
    its weights; a RuntimeError says so otherwise.
    """
    captured: list[torch.Tensor] = []
    hook = None
    if attn_layer is not None:  # eager attention returns (output, weights (B, H, T, T)); keep only the weights
        layer = model.model.language_model.layers[attn_layer].self_attn
        hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out[1]))
    try:
        out = model(inputs_embeds=embeds, attention_mask=attention_mask)
    finally:
        if hook is not None:
            hook.remove()
    if attn_layer is None:
        return out.logits.float(), None
    if not captured or captured[0] is None:
        raise RuntimeError("attention supervision needs the LM on eager attention: see eager_attention()")
    return out.logits.float(), captured[0]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T) (``IGNORE_INDEX`` except on
    answer tokens and their ``</s>``), mean over the labelled tokens."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def dense_loss(logits: torch.Tensor, slots: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The dense auxiliary loss: at each image placeholder (``slots`` (B, T) bool, N of them), cross-entropy
    of the LM head's logits (B, T, V), unshifted (the position's own output), against its two target words
    ``targets`` (N, 2); mean over the labelled (token, word) pairs."""
    image_logits = logits[slots].view(-1, logits.shape[-1])  # (N, V), row-major like the targets
    return torch.nn.functional.cross_entropy(
        image_logits.repeat_interleave(2, dim=0), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _patch_attention_mass(
    attention: torch.Tensor, first: int, keep: torch.Tensor, rows: torch.Tensor, named: torch.Tensor
) -> torch.Tensor:
    """(Q,) attention mass of each supervised answer on its named patches, plain batch: ``attention`` (Q, T)
    from the answer-predicting positions, ``first`` the sequence position of every row's first image token,
    ``keep`` (B, n_patches) the patches that reach the LM (in positional order), ``rows`` (Q,) each answer's
    batch row, ``named`` (Q, n_patches) bool the named kept patches."""
    seq_pos = first + keep.long().cumsum(1) - 1  # (B, n_patches): where a kept patch sits in its row
    on_patch = attention.gather(1, seq_pos[rows].clamp(0, attention.shape[1] - 1)) * keep[rows]
    return (on_patch * named).sum(-1)


def _token_attention_mass(
    attention: torch.Tensor, first: int, slots: torch.Tensor, rows: torch.Tensor, named: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass (Q,), has (Q,) bool) of each supervised answer on the image tokens it should attend to,
    mixture-augmented batch: ``attention`` (Q, T) from the answer-predicting positions, ``first`` the
    sequence position of every row's first image token, ``slots`` (B, T) bool the image placeholders,
    ``rows`` (Q,) each answer's batch row, ``named`` (Q, N) bool among all N image tokens of the batch.
    ``has``: the answers with at least one such token in their own row."""
    counts = slots.sum(1)  # (B,) image tokens per row
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])  # row r's first token among all
    token = torch.arange(named.shape[1], device=named.device)
    local = token.unsqueeze(0) - starts[rows].unsqueeze(1)  # (Q, N): index within the answer's row
    mine = (local >= 0) & (local < counts[rows].unsqueeze(1)) & named
    on = attention.gather(1, (first + local).clamp(0, attention.shape[1] - 1)) * mine
    return on.sum(-1), mine.any(1)


def attention_loss(
    weights: torch.Tensor, slots: torch.Tensor, batch: Batch, named: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Mean over the supervised answers (``batch.attn_rows``, ``batch.attn_positions``, Q of them) of
    -log(attention mass, heads averaged, from the answer-predicting position onto what the question names).

    ``weights`` (B, H, T, T): the supervised layer's attention; ``slots`` (B, T) bool: the image
    placeholders (every row's image run starts at the same position). ``named``: None for a plain batch (the
    named patches are ``batch.attn_patches`` (Q, n_patches), among ``batch.keep``), else (Q, N) bool among
    all N image tokens of a mixture-augmented batch, where answers without a named token in their row are
    left out (0 when none is left).
    """
    first = int(slots[0].nonzero()[0, 0])  # the same prefix in every row
    rows, positions = batch.attn_rows.to(device), batch.attn_positions.to(device)
    attention = weights[rows, :, positions].float().mean(1)  # (Q, T): heads averaged
    if named is None:
        mass = _patch_attention_mass(attention, first, batch.keep.to(device), rows, batch.attn_patches.to(device))
        return -torch.log(mass + 1e-6).mean()
    mass, has = _token_attention_mass(attention, first, slots, rows, named)
    if not has.any():
        return torch.zeros((), device=device)
    return -torch.log(mass[has] + 1e-6).mean()


def loss_terms(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    batch: Batch,
    device: torch.device,
    attn_layer: int | None = None,
    teacher: LlavaForConditionalGeneration | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, dense auxiliary loss, attention loss, distillation loss) of one batch, scalars.

    The LM gets, in each image's placeholder run, the tokens of ``lm_image_tokens``. Answer loss:
    ``answer_loss``. Auxiliary loss: ``dense_loss``. Attention loss (``attn_layer`` given and the batch has
    supervised answers; the LM must run eager attention): ``attention_loss`` on that layer's weights; else 0.
    Distillation loss (``teacher`` given): ``distill_loss`` on the full-image rows; else 0.
    """
    input_ids = batch.input_ids.to(device)
    slots = input_ids == model.config.image_token_id  # (B, T)
    tokens, targets, named = lm_image_tokens(model, processor, batch, device)
    embeds = model.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), tokens.to(embeds.dtype))
    supervised = attn_layer if attn_layer is not None and len(batch.attn_rows) > 0 else None
    logits, weights = forward_capturing_attention(model, embeds, batch.attention_mask.to(device), supervised)
    answer = answer_loss(logits, batch.labels.to(device))
    aux = dense_loss(logits, slots, targets)
    attn = torch.zeros((), device=device)
    if weights is not None:
        attn = attention_loss(weights, slots, batch, named, device)
    distill = torch.zeros((), device=device)
    if teacher is not None:
        distill = distill_loss(logits, teacher, processor, batch, device)
    return answer, aux, attn, distill


__all__ = [
    "answer_loss", "attention_loss", "dense_loss", "distill_loss", "eager_attention", "forward_capturing_attention",
    "full_rows", "lm_image_tokens", "loss_terms", "losses", "mixed_image_tokens",
]  # fmt: skip

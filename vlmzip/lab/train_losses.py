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
    vt = adapter.tower.tokens(pixel_values(batch.pixels.to(device), processor), adapter.layout,
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


def loss_terms(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    batch: Batch,
    device: torch.device,
    attn_layer: int | None = None,
    teacher: LlavaForConditionalGeneration | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, dense auxiliary loss, attention loss, distillation loss) of one batch.

    The LM gets, in each image's placeholder run, the projected features of that image's kept patches
    (``batch.keep``; all of them: exactly the stock ``model(input_ids, pixel_values)`` forward).
    Answer loss: next-token cross-entropy on answer tokens and their ``</s>`` (mean over those tokens).
    Auxiliary loss: at each image-placeholder position, cross-entropy of the LM head's logits (unshifted:
    the position's own output) against the patch's target words; mean over labelled (patch, word) pairs.
    Attention loss (``attn_layer`` given; the LM must run eager attention): mean over supervised answers
    of -log(attention mass, heads averaged, from the answer-predicting position onto the named patches).
    Distillation loss (``teacher`` given): ``distill_loss`` on the full-image rows; else 0.
    """
    input_ids = batch.input_ids.to(device)
    keep = batch.keep.to(device)
    slots = input_ids == model.config.image_token_id
    if batch.mix is not None:
        kept, mixed_targets, mixed_named = mixed_image_tokens(model, processor, batch, device)
    else:
        features = model.model.get_image_features(
            pixel_values(batch.pixels.to(device), processor),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output  # B x (n_patches, D)
        kept = torch.stack(list(features))[keep]  # (kept patches of all rows, D), row-major like the slots
    embeds = model.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), kept.to(embeds.dtype))
    supervise = attn_layer is not None and len(batch.attn_rows) > 0
    captured: list[torch.Tensor] = []
    hook = None
    if supervise:  # eager attention returns (output, weights (B, H, T, T)); keep only this layer's weights
        layer = model.model.language_model.layers[attn_layer].self_attn
        hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out[1]))
    try:
        out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device))
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits.float()
    vocab = logits.shape[-1]
    labels = batch.labels.to(device)
    answer = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    image_logits = logits[slots].view(-1, vocab)  # row-major kept patches
    targets = (mixed_targets if batch.mix is not None else batch.patch_targets.to(device)[keep]).reshape(-1)
    aux = torch.nn.functional.cross_entropy(
        image_logits.repeat_interleave(2, dim=0), targets, ignore_index=IGNORE_INDEX
    )
    attn = torch.zeros((), device=device)
    if supervise:
        first = int(slots[0].nonzero()[0, 0])  # the same prefix in every row
        rows, positions = batch.attn_rows.to(device), batch.attn_positions.to(device)
        if not captured or captured[0] is None:
            raise RuntimeError("attention supervision needs the LM on eager attention: see eager_attention()")
        weights = captured[0][rows, :, positions].float().mean(1)  # (Q, T): heads averaged
        if batch.mix is not None:  # token-level targets: the image run of row r starts at `first`
            counts = slots.sum(1)
            starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])  # row r's first token among all
            token = torch.arange(mixed_named.shape[1], device=device)
            local = token.unsqueeze(0) - starts[rows].unsqueeze(1)  # (Q, N): index within the answer's row
            mine = (local >= 0) & (local < counts[rows].unsqueeze(1)) & mixed_named
            on = weights.gather(1, (first + local).clamp(0, weights.shape[1] - 1)) * mine
            has = mine.any(1)
            if has.any():
                attn = -torch.log(on.sum(-1)[has] + 1e-6).mean()
        else:
            seq_pos = first + keep.long().cumsum(1) - 1  # (B, n_patches): where a kept patch sits in its row
            on_patch = weights.gather(1, seq_pos[rows].clamp(0, weights.shape[1] - 1)) * keep[rows]
            mass = (on_patch * batch.attn_patches.to(device)).sum(-1)
            attn = -torch.log(mass + 1e-6).mean()
    distill = torch.zeros((), device=device)
    if teacher is not None:
        distill = distill_loss(logits, teacher, processor, batch, device)
    return answer, aux, attn, distill

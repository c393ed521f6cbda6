"""What one training update minimises: the answer loss, the dense auxiliary loss and the attention loss
(plus ``eager_attention``, the switch the attention loss needs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlmzip.lab.train_data import IGNORE_INDEX, Batch, pixel_values


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


def losses(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    batch: Batch,
    device: torch.device,
    attn_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, dense auxiliary loss, attention loss) of one batch.

    The LM gets, in each image's placeholder run, the projected features of that image's kept patches
    (``batch.keep``; all of them: exactly the stock ``model(input_ids, pixel_values)`` forward).
    Answer loss: next-token cross-entropy on answer tokens and their ``</s>`` (mean over those tokens).
    Auxiliary loss: at each image-placeholder position, cross-entropy of the LM head's logits (unshifted:
    the position's own output) against the patch's target words; mean over labelled (patch, word) pairs.
    Attention loss (``attn_layer`` given; the LM must run eager attention): mean over supervised answers
    of -log(attention mass, heads averaged, from the answer-predicting position onto the named patches).
    """
    input_ids = batch.input_ids.to(device)
    keep = batch.keep.to(device)
    slots = input_ids == model.config.image_token_id
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
    targets = batch.patch_targets.to(device)[keep].reshape(-1)
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
        seq_pos = first + keep.long().cumsum(1) - 1  # (B, n_patches): where a kept patch sits in its row
        on_patch = weights.gather(1, seq_pos[rows].clamp(0, weights.shape[1] - 1)) * keep[rows]
        mass = (on_patch * batch.attn_patches.to(device)).sum(-1)
        attn = -torch.log(mass + 1e-6).mean()
    return answer, aux, attn

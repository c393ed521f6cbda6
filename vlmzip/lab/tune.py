"""``vlmzip tune``: fine-tune only the projector of a LLaVA model on compressed tokens (VisionZip's, arXiv
2412.04467, "VisionZip-tuned" mode: the projector learns the compressed tokens' distribution; vision tower and
LLM frozen).

Data: the lab training split (``vlmzip.lab.train_data.image_sample``: every question of an image packed into
one multi-turn conversation), from ``image_offset`` on, so that the images are not the lab recipe's. Each
update: the compressed model's own ``get_image_features`` (the method runs exactly as at inference) gives
``tokens`` features per image, they fill the image run of the conversation (``tokens`` placeholders), and
the answer tokens' cross-entropy trains the projector. The result is saved as a plain model
(``vlmzip.io.load_model`` loads it) that is meant to be used compressed with the same method and budget.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

DEFAULT_IMAGE_OFFSET = 200_000  # far past every image of the lab recipe (base run + continuation)


@dataclass
class TuneConfig:
    """Knobs of a projector fine-tune (``vlmzip tune`` flags)."""

    method: str = "visionzip"
    tokens: int = 64
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-5  # VisionZip's projector fine-tune (arXiv 2412.04467)
    seed: int = 0
    image_offset: int = DEFAULT_IMAGE_OFFSET
    log_every: int = 10


def tunable_method(method: str) -> None:
    """A clear error unless ``method`` is a registered pre-LLM method (an in-LLM method sends the
    projector's output on uncompressed: there is nothing compressed for it to learn)."""
    from vlmzip.methods import get_method

    spec = get_method(method)
    if spec.stage == "llm":
        raise ValueError(f"vlmzip tune fine-tunes the projector on compressed tokens: {method!r} prunes inside the "
                         "LLM, after the projector; use a pre-LLM method (e.g. visionzip, random, pool, tome)")
    if spec.name == "vanilla":
        raise ValueError("vlmzip tune needs a compressing method (vanilla keeps every token)")


def conversations(
    processor: LlavaProcessor, cfg: TuneConfig, step: int, image_tokens: int
) -> tuple[list[Image.Image], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images and right-padded (input_ids, attention_mask, labels) (B, L) of update ``step``, each with an
    image run of ``image_tokens`` placeholders (the compressed count)."""
    from vlmzip.lab.train_config import TrainConfig
    from vlmzip.lab.train_data import IGNORE_INDEX, encode_conversation, image_sample

    data = TrainConfig(batch_size=cfg.batch_size, seed=cfg.seed, image_offset=cfg.image_offset, easy_scale=1.0)
    tokenizer = processor.tokenizer
    images, seqs = [], []
    for index in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        image, _, qas = image_sample(data, index)
        images.append(image)
        seqs.append(encode_conversation(qas, tokenizer, image_tokens))
    length = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(seqs):
        input_ids[row, : len(ids)], labels[row, : len(lab)], mask[row, : len(ids)] = (
            torch.tensor(ids), torch.tensor(lab), 1)
    return images, input_ids, mask, labels


def answer_loss(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: list[Image.Image],
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Answer cross-entropy of a compressed LLaVA on one batch: the compressed features (B x (K, D), from the
    model's own compressing ``get_image_features``) fill the K placeholders of each row."""
    from vlmzip.lab.train_data import IGNORE_INDEX

    device = next(model.parameters()).device
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
    features = model.model.get_image_features(pixels).pooler_output  # B x (K, D)
    input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
    slots = input_ids == model.config.image_token_id
    if int(slots.sum()) != sum(f.shape[0] for f in features):
        raise ValueError(f"the method sent {[f.shape[0] for f in features]} tokens per image, the conversation has "
                         f"{slots.sum(1).tolist()} image placeholders")
    embeds = model.get_input_embeddings()(input_ids)
    embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), torch.cat(list(features)).to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden).float()
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def tune(model_dir: str | Path | None, out: str | Path, cfg: TuneConfig, device: str = "cpu") -> Path:
    """Fine-tune the projector of the model in ``model_dir`` (None: the lab model) on ``cfg.method`` at
    ``cfg.tokens`` tokens per image; save the plain model (and ``tune.json``, ``log.jsonl``) to ``out``."""
    import vlmzip
    from vlmzip.io import load_model

    tunable_method(cfg.method)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError("need steps >= 1, batch_size >= 1 and lr > 0")
    torch.manual_seed(cfg.seed)
    model, processor = load_model(str(model_dir) if model_dir else None, device=device)
    projector = model.model.multi_modal_projector
    for p in model.parameters():
        p.requires_grad_(False)
    for p in projector.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=0.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("w")
    vlmzip.compress(model, cfg.method, tokens=cfg.tokens, padding_side="right")
    k = vlmzip.state_of(model).pre_keep(vlmzip.plan(model, "vanilla").tokens)
    model.eval()  # no dropout; the projector still learns
    start, losses = time.perf_counter(), []
    try:
        for step in range(cfg.steps):
            loss = answer_loss(model, processor, *conversations(processor, cfg, step, k))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = {"step": step + 1, "loss": sum(losses) / len(losses), "s": time.perf_counter() - start}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"update {row['step']}/{cfg.steps}: loss {row['loss']:.4f}", file=sys.stderr)
                losses = []
    finally:
        vlmzip.decompress(model)
        log.close()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tune.json").write_text(json.dumps({**asdict(cfg), "model": str(model_dir or "lab"), "image_tokens": k},
                                              indent=2) + "\n")
    return out


__all__ = ["DEFAULT_IMAGE_OFFSET", "TuneConfig", "answer_loss", "conversations", "tune", "tunable_method"]

"""``TrainConfig``: every knob of a lab training run, and what follows from it alone (the model's
architecture and words, the learning-rate schedule, image tokens per image); and the flags of
``vlmzip lab train`` (``add_parser``, ``config_from_args``).

Free of torch and transformers (and of PIL): the command line builds its parser, and answers ``--help``,
without importing them. What needs them is imported inside the functions that use it (``model_config``,
``lab_words``); the torch dtypes of ``precision`` are ``vlmzip.lab.train.PRECISIONS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmzip.builders.llava import LlavaSpec

PRECISION_NAMES = ("bf16", "fp32")  # vlmzip.lab.train.PRECISIONS maps them to torch dtypes

# Fields that only act from the augmentation's first update (drop_from) on: a branch (``branch_from``) may
# change them, since every earlier update is the same without them.
LATE_FIELDS = frozenset({"drop_prob", "drop_min_keep", "drop_from", "mix"})

# Fields that only change bookkeeping or where the run happens, not what is computed: they may differ
# between an interrupted run and its resumption. Every other field must match the checkpoint.
RUNTIME_FIELDS = frozenset(
    {"device", "threads", "workers", "checkpoint_every", "log_every", "eval_every", "eval_limit", "progress"}
)


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults: the base run of the shipped checkpoint; its second stage (a
    continuation: init_from, mix, distill, freeze_vision) is in docs/lab-model.md."""

    # optimisation
    steps: int = 4400  # as many as the 60-minute budget on 2 CPU cores allows at these sizes
    batch_size: int = 16  # images per update (each carries 3-7 questions)
    lr: float = 2e-3
    min_lr: float = 1e-4  # cosine decay from lr to min_lr after warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.05  # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0
    # data: image i of the train stream is sampled with questions_per_image[i % len(...)] questions;
    # 7 = one of every type (best use of an encoded image), 3 = the benchmark's own scene distribution
    # (1-object scenes and scenes without text only occur there).
    questions_per_image: tuple[int, ...] = (7, 7, 7, 3)
    # curriculum: objects and text drawn up to easy_scale times larger (and fewer objects) at the start; the
    # largest scale decays linearly to 1 (the benchmark's own scenes) at easy_until * steps. Why: trained
    # from scratch, the LM does not learn to find objects that cover a few % of the image tokens and settles
    # on answer priors; big objects give the attention a signal to start from.
    easy_scale: float = 3.0
    easy_until: float = 0.5
    # dense auxiliary loss: at every image-token position the LM head also predicts what that patch shows
    # (its object's colour and shape word, the written word/number, or <pad> for background), read off the
    # scene graph: one label per patch (256 per image at these sizes) instead of 3-7 answers. Training-only
    # (no extra weights): the exported model is a plain LLaVA. 0 = off.
    aux_weight: float = 0.5
    aux_min_cover: float = 0.1  # a patch is labelled with an object/text covering >= this share of it
    # attention supervision: at every answer, the LM's layer attn_layer (heads averaged) is trained to put
    # its attention on the image patches of what the question names (``train_data.named_objects``): the loss is
    # -log(attention mass on those patches). Why: trained from scratch, the LM does not learn to look the
    # named object up (an associative-recall plateau). Training-only; 0 = off. It needs eager attention in
    # the whole LM (``train_losses.eager_attention``), which costs little at 256 image tokens and much at
    # 576 (docs/lab-model.md, "Architecture").
    attn_weight: float = 1.0
    attn_layer: int = 1
    # token-count augmentation: with probability drop_prob an image reaches the LM as a random subset of its
    # patches (kept share uniform in [drop_min_keep, 1), positional order), so that the LM sees image runs of
    # every length. Why: trained only on full-length image runs, the LM is thrown by a shorter sequence (a
    # compressed image) and answers out of format.
    # A pretrained LLM has seen text of every length; this gives the from-scratch lab LM that robustness, so
    # the benchmark measures what compression loses, not a length the LM never saw. Training-only; 0 = off.
    drop_prob: float = 0.5
    drop_min_keep: float = 0.1
    # ... applied only from update drop_from * steps on. Why late: from the start it costs vanilla accuracy
    # at this budget (the LM learns less from fewer patches), while at the end of training (low lr) it
    # removes the length fragility and keeps vanilla accuracy (docs/lab-model.md).
    drop_from: float = 0.93
    # mixture augmentation (vlmzip.lab.train_mix): a shortened image is built by a random component (random,
    # strided or salient subset, CLS kept or not, means of neighbouring or similar patches, salient + merged)
    # instead of the random subset only, so that no method's pattern is favoured. Off in the base run; on in
    # the continuation phase (docs/lab-model.md, "Stage 2").
    mix: bool = False
    # continuation: start from the weights of this model folder (fresh optimizer) instead of ``seed``'s
    # initialisation; image_offset: the first train-stream image (to continue on images the base run never saw)
    init_from: str = ""
    image_offset: int = 0
    # continuation anchor: on every row whose image reaches the LM whole, add distill * KL(init model || this
    # model) of the answer-token distributions (the --init-from model, frozen, as the teacher on the same
    # inputs). Why: a continuation with a fresh optimizer drifts from what the base run learned about whole
    # images and loses vanilla accuracy; the anchor keeps full-image answers where they were while the
    # shortened rows teach the new patterns. Training-only; 0 = off; needs init_from.
    distill: float = 0.0
    # continuation: train the projector and the LM only, the vision tower frozen. Why: nothing in training
    # supervises the CLS token's attention (LLaVA drops CLS), yet VisionZip and Cluster & Saliency rank
    # patches by it; a continuation that trains the tower scrambles it (the share of VisionZip's
    # 54 dominant tokens on objects fell from 36 % to the 12.5 % chance level), which charges those methods
    # for a drift the base model never had (docs/lab-model.md, "Stage 2").
    freeze_vision: bool = False
    # branch: start from another run's checkpoint (weights, AdamW state, RNG, update count) taken before its
    # augmentation starts, with other late-phase fields (LATE_FIELDS). Every update before the augmentation
    # is a pure function of the other fields, so the branch equals a whole run with its own config, for the
    # cost of the late phase only: one base run to drop_from, then any number of late-phase recipes.
    branch_from: str = ""
    # model (see LlavaSpec). 336 px / patch 21 = 256 patch tokens + CLS, not LLaVA-1.5's 576 (patch 14):
    # an update at 576 costs too much for the 60-minute CPU budget, above all with attention supervision
    # (docs/lab-model.md, "Architecture"). 336 px keeps the benchmark's images unresampled; budgets are
    # compared at the same share of the patches (vlmzip.paper_budget: 192/128/64 of 576 -> 85/57/28).
    image_size: int = 336
    patch_size: int = 21
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 512
    # numerics of the forward pass: "fp32" = plain float32; "bf16" = torch.autocast to bfloat16 (weights,
    # optimizer state and the exported model stay float32; losses are computed in float32). bf16 is faster
    # per update on a CPU with native bf16 (AVX512-BF16/AMX) and slower on one without; fp32 is the recipe
    # because bf16 learned worse at these sizes.
    precision: str = "fp32"
    # runtime / bookkeeping
    device: str = "cpu"
    threads: int = 2  # torch CPU threads of the training process; 0 = torch's default
    workers: int = 0  # data-rendering processes (1 thread each); 0 = render in the training process
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate only at the end
    eval_limit: int = 70  # val images per evaluation (3 questions each); 0 = no evaluation
    progress: bool = True

    def __post_init__(self) -> None:
        from vlmzip.lab import scenes  # here, not at the top: the CLI builds its parser without PIL

        self.questions_per_image = tuple(int(q) for q in self.questions_per_image)
        if not self.questions_per_image or not all(
            1 <= q <= len(scenes.QUESTION_TYPES) for q in self.questions_per_image
        ):
            raise ValueError(f"questions_per_image must be 1..{len(scenes.QUESTION_TYPES)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 <= self.drop_prob <= 1 or not 0 < self.drop_min_keep <= 1 or not 0 <= self.drop_from <= 1:
            raise ValueError("need 0 <= drop_prob <= 1, 0 < drop_min_keep <= 1 and 0 <= drop_from <= 1")
        if self.distill < 0 or (self.distill > 0 and not self.init_from):
            raise ValueError(f"distill={self.distill}: needs a value >= 0, and --init-from (the teacher is the "
                             "model the continuation starts from); use distill=0 for a run from scratch")
        if self.image_offset < 0:
            raise ValueError(f"image_offset must be >= 0 (got {self.image_offset})")
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"precision must be one of {sorted(PRECISION_NAMES)} (got {self.precision!r})")
        if self.attn_weight > 0 and not 0 <= self.attn_layer < self.text_layers:
            raise ValueError(
                f"attn_layer={self.attn_layer} is not a layer of the {self.text_layers}-layer LM;"
                f" use 0..{self.text_layers - 1}, or attn_weight=0 to turn attention supervision off"
            )


def lab_words() -> tuple[str, ...]:
    """Tokenizer words of the lab model: the chat words plus every word of the benchmark."""
    from vlmzip.builders.words import BASE_WORDS
    from vlmzip.lab import scenes

    return tuple(dict.fromkeys([*BASE_WORDS, *scenes.vocabulary()]))


def model_config(cfg: TrainConfig) -> LlavaSpec:
    """The LlavaSpec (architecture + tokenizer words) a TrainConfig trains."""
    from vlmzip.builders.llava import LlavaSpec

    shared = {f.name for f in dataclasses.fields(LlavaSpec)} & {f.name for f in dataclasses.fields(TrainConfig)}
    return LlavaSpec(**{name: getattr(cfg, name) for name in shared}, words=lab_words())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then cosine from lr to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def image_tokens(cfg: TrainConfig) -> int:
    """Image placeholders per image in the LM sequence (LLaVA "default" strategy: patches, no CLS)."""
    return (cfg.image_size // cfg.patch_size) ** 2


# One line per flag of ``vlmzip lab train`` (the comments above say why each default is what it is).
FLAG_HELP: dict[str, str] = {
    "steps": "optimizer updates",
    "batch_size": "images per update (each carries 3-7 questions)",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "updates of linear warm-up",
    "weight_decay": "AdamW weight decay (matrices and embeddings only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "gradient norm clipping",
    "seed": "seed of the initialisation and the question order",
    "questions_per_image": "questions per train image, cycled over the images (7 = one of every type)",
    "easy_scale": "curriculum: objects and text up to this many times larger at the start",
    "easy_until": "curriculum: share of the updates after which scenes are the benchmark's own",
    "aux_weight": "weight of the dense loss naming what each image token shows (0 = off)",
    "aux_min_cover": "a patch is labelled with an object covering at least this share of it",
    "attn_weight": "weight of the attention supervision on the named objects' patches (0 = off)",
    "attn_layer": "LM layer whose attention is supervised",
    "drop_prob": "token-count augmentation: probability that an image reaches the LM as a subset of its patches",
    "drop_min_keep": "token-count augmentation: smallest share of the patches kept",
    "drop_from": "token-count augmentation: share of the updates after which it applies",
    "mix": "mixture augmentation: shortened images by a random method-like component, not random subsets only",
    "init_from": "start from this model folder's weights (continuation phase) instead of a fresh initialisation",
    "distill": "continuation: weight of the KL to the --init-from model's answers on full-image rows (0 = off)",
    "freeze_vision": "train the projector and the LM only (continuation: keeps the tower's CLS attention)",
    "image_offset": "first image of the train stream (continuation: images the base run did not see)",
    "branch_from": "start from this run folder's checkpoint taken before its augmentation (exact: equals the "
    "whole run with this config's late-phase fields)",
    "image_size": "image side in pixels",
    "patch_size": "vision patch side in pixels",
    "vision_hidden": "vision tower width",
    "vision_layers": "vision tower layers",
    "vision_heads": "vision tower attention heads",
    "vision_intermediate": "vision tower MLP width",
    "text_hidden": "language model width",
    "text_layers": "language model layers",
    "text_heads": "language model attention heads",
    "text_kv_heads": "language model key/value heads",
    "text_intermediate": "language model MLP width",
    "precision": "numerics of the forward pass: fp32, or bf16 autocast",
    "device": "where to train: cpu, cuda or cuda:N",
    "threads": "torch CPU threads (0 = torch's default)",
    "workers": "data-rendering processes (0 = render in the training process)",
    "checkpoint_every": "updates between checkpoints",
    "log_every": "updates between log lines",
    "eval_every": "updates between validation runs (0 = only at the end)",
    "eval_limit": "validation images per evaluation, 3 questions each (0 = no evaluation)",
    "progress": "show a progress bar",
}


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def add_parser(
    subparsers: argparse._SubParsersAction, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """Register ``train`` on ``subparsers`` (e.g. the ``lab`` command's), running ``func``; one flag per
    TrainConfig field, left None unless given (``config_from_args`` fills in the defaults)."""
    p = subparsers.add_parser(
        "train", help="train the lab mini-VLM from scratch (resumable)",
        description="Train the lab mini-VLM from scratch on the procedural scenes; rerun the same command to "
        "resume. The defaults are the recipe of the shipped checkpoint (about an hour on 2 CPU cores).",
    )
    p.add_argument("--out", default="runs/lab", help="run folder: checkpoint/, log.jsonl, loss.png, model/ "
                   "(default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop with a checkpoint (no export) after N updates, e.g. at the augmentation's first "
                   "update, to --branch-from it with other late-phase recipes (default: run all --steps)")
    for f in dataclasses.fields(TrainConfig):
        default = _default(f)
        flag = "--" + f.name.replace("_", "-")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{FLAG_HELP[f.name]} (default: {shown})".replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument(flag, type=_bool, default=None, metavar="BOOL", help=help_text)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=_ints, default=None, metavar="N,N,..", help=help_text)
        else:
            p.add_argument(flag, type=type(default), default=None, help=help_text)
    p.set_defaults(func=func)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig with the flags that were given; the other fields keep their defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    return TrainConfig(**given)


__all__ = [
    "FLAG_HELP", "LATE_FIELDS", "PRECISION_NAMES", "RUNTIME_FIELDS", "TrainConfig", "add_parser", "config_from_args",
    "image_tokens", "lab_words", "lr_at", "model_config",
]  # fmt: skip

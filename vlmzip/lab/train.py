"""Train the lab mini-VLM: ``vlmzip lab train [--out DIR]``. This module: the loop, checkpoints, logs,
the quick val monitor, export and the command line.

The model is ``build_llava`` (CLIP ViT with CLS -> 2-layer GELU MLP -> Llama decoder, LLaVA-1.5 layout:
features from vision layer -2, CLS dropped) trained from scratch on the procedural scenes of
``vlmzip.lab.scenes``. Default: 336 px, patch 21, 256 patch tokens + CLS (LLaVA-1.5's patch 14 / 576
tokens does not fit the 60-minute CPU budget; ``TrainConfig`` says why).

The rest of the training code is in three modules, whose names this one re-exports (so that
``vlmzip.lab.train`` stays the one namespace of training for the CLI and the tests):
``train_config`` (``TrainConfig``, every knob, and what follows from it alone), ``train_data`` (the
batch of every update, a pure function of config and step: packed multi-turn conversations, curriculum,
patch targets, token-count augmentation) and ``train_losses`` (answer, dense auxiliary and attention
losses).

Four training-only aids, all knobs of ``TrainConfig`` (the exported model is a plain LLaVA either way):
a size curriculum (big objects first, the benchmark's scenes from half-way on), a dense auxiliary loss
(the LM head names what every image-token position shows: colour + shape word, the written word, or
background) and attention supervision (at every answer, one LM layer is trained to look at the patches
of what the question names, read off the scene graph: ``named_objects``, ``patch_owners``), plus an
optional token-count augmentation (random subsets of an image's patches reach the LM: ``kept_patches``).

The defaults are the recipe of the shipped checkpoint; its training time, accuracy and the runs that
chose each knob are in BENCHMARKS.md ("The shipped lab mini-VLM" and the sections after it).

Outputs in ``out_dir``: ``checkpoint/state.pt`` (model, optimizer, RNG, step; written every
``checkpoint_every`` updates and on Ctrl-C), ``log.jsonl`` (loss, lr, grad norm, throughput, evals),
``loss.png``, ``train_config.json`` and ``model/`` (``save_pretrained`` of model + processor: loads with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``, offline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlmzip.eval.scorers import score_records
from vlmzip.io import generate_answers
from vlmzip.lab import scenes
from vlmzip.lab.train_config import (
    PRECISIONS,
    RUNTIME_FIELDS,
    TrainConfig,
    image_tokens,
    lab_words,
    lr_at,
    model_config,
)
from vlmzip.lab.train_data import (
    IGNORE_INDEX,
    Batch,
    _tokenizer,  # noqa: F401  (the tests reach it here)
    batches,
    drop_start,
    encode_conversation,
    image_sample,
    kept_patches,
    make_batch,
    named_objects,
    owner_words,
    patch_owners,
    pixel_values,
    scene_config,
    scene_scale,
    shuffled,
    to_uint8,
)
from vlmzip.lab.train_losses import eager_attention, losses
from vlmzip.tiny import build_llava

CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = _fingerprint(cfg)
    before = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k not in RUNTIME_FIELDS}
    diff = [f"{k}: checkpoint {before.get(k)!r} vs now {now.get(k)!r}" for k in now if before.get(k) != now.get(k)]
    if diff:
        raise ValueError(
            "the checkpoint was made with another config (" + "; ".join(diff) + ");"
            " use another --out, or --no-resume to start over"
        )


def save_checkpoint(
    path: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> None:
    """Write model, optimizer, RNG state and step to ``path`` atomically."""
    state = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "config": asdict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; return its step."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint version {state.get('version')!r}")
    _check_resumable(state["config"], cfg)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on tensors of rank >= 2 (matrices, embeddings), none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


# ---------------------------------------------------------------------------------------------------------
# Logging


def _read_log(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= up_to_step]


def plot_loss(log_path: Path, out_png: Path) -> None:
    """Loss curve (and val accuracy, when logged) from ``log.jsonl`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_log(log_path, up_to_step=sys.maxsize)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (answer tokens)")
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in evals], [r["eval"]["accuracy"] for r in evals], "o-", color="C1", label="val accuracy"
        )
        ax2.set_ylabel("val accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("vlmzip lab model")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Evaluation (quick monitor; the full harness lives in vlmzip.eval)


def _split_items(split: str, limit: int | None) -> Iterator[tuple[Image.Image, scenes.QA]]:
    spec = scenes.SPLITS[split]
    n = spec.n_images if limit is None else min(limit, spec.n_images or limit)
    for index in range(n):
        image, _, qas = scenes.sample(spec.seed, index)
        for qa in qas:
            yield image, qa


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    split: str = "val",
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 4,
) -> dict[str, Any]:
    """Greedy answers to the first ``limit`` images (all when None) of a benchmark split, exact match.

    Uses the plain processor -> ``generate`` path (so a ``vlmzip.compress``-ed model is evaluated
    compressed). Returns ``scorers.score_records``' summary: n, accuracy, per_type, per_subtype, pope.
    """
    was_training = model.training
    model.eval()
    records = []
    try:
        for chunk in _chunks(_split_items(split, limit), batch_size):
            images, questions = [im for im, _ in chunk], [qa.question for _, qa in chunk]
            texts = generate_answers(model, processor, images, questions, max_new_tokens)
            for (_, qa), text in zip(chunk, texts, strict=True):
                records.append({"prediction": text, "answers": [qa.answer], "type": qa.type, "subtype": qa.subtype})
    finally:
        model.train(was_training)
    return score_records(records)


def format_eval(result: dict[str, Any]) -> str:
    """One line: overall and per-type accuracy in percent."""
    per_type = " ".join(f"{t} {v['accuracy'] * 100:.0f}" for t, v in result["per_type"].items())
    return f"acc {result['accuracy'] * 100:.1f} (n={result['n']}) | {per_type}"


# ---------------------------------------------------------------------------------------------------------
# Training


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """The autocast context of ``cfg.precision`` on ``device`` (disabled for fp32)."""
    dtype = PRECISIONS[cfg.precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train(
    out_dir: str | Path, cfg: TrainConfig | None = None, resume: bool = True, stop_after: int | None = None
) -> Path:
    """Train (or resume) into ``out_dir``; return the exported model folder ``out_dir/model``.

    ``stop_after``: stop (with a checkpoint, without export) once this many updates are done; used to
    simulate an interruption. Ctrl-C also writes a checkpoint before stopping.
    """
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint" / "state.pt"
    log_path = out / "log.jsonl"
    if cfg.threads > 0:  # also on GPU: several runs on one machine otherwise oversubscribe its cores
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)

    # Built on the CPU then moved, so that every device starts from the same weights.
    model, processor = build_llava(None, model_config(cfg))
    model.to(device).train()
    restore_attention = eager_attention(model) if cfg.attn_weight > 0 else None
    optimizer = make_optimizer(model, cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    start = 0
    if resume and ckpt_path.exists():
        start = load_checkpoint(ckpt_path, model, optimizer, cfg)
        print(f"resumed from {ckpt_path} at update {start}/{cfg.steps}", file=sys.stderr)
    rows = _read_log(log_path, up_to_step=start)  # drop log lines written after the checkpoint
    log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def log(row: dict[str, Any]) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    step = start
    window: list[float] = []
    aux_window: list[float] = []
    attn_window: list[float] = []
    t_window = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="upd", dynamic_ncols=True)
    try:
        data = batches(cfg, start)
        while step < end:
            batch = next(data)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(cfg, device):
                answer_loss, aux_loss, attn_loss = losses(
                    model, processor, batch, device, cfg.attn_layer if cfg.attn_weight > 0 else None
                )
                loss = answer_loss + cfg.aux_weight * aux_loss + cfg.attn_weight * attn_loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.append(answer_loss.item())
            aux_window.append(aux_loss.item())
            attn_window.append(attn_loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]:.3f}", lr=f"{lr:.1e}")
            if step % cfg.log_every == 0 or step == end:
                elapsed = time.perf_counter() - t_window
                log(
                    {
                        "step": step,
                        "loss": sum(window) / len(window),
                        "aux_loss": sum(aux_window) / len(aux_window),
                        "attn_loss": sum(attn_window) / len(attn_window),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "images_per_s": len(window) * cfg.batch_size / elapsed,
                        "s_per_step": elapsed / len(window),
                    }
                )
                window, aux_window, attn_window, t_window = [], [], [], time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == end:
                save_checkpoint(ckpt_path, step, model, optimizer, cfg)
            if cfg.eval_every and cfg.eval_limit and step % cfg.eval_every == 0 and step < cfg.steps:
                result = evaluate(model, processor, "val", limit=cfg.eval_limit)
                log({"step": step, "eval": {k: result[k] for k in ("n", "accuracy", "per_type")}})
                print(f"\nupdate {step}: val {format_eval(result)}", file=sys.stderr)
                t_window = time.perf_counter()
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, step, model, optimizer, cfg)
        print(f"\ninterrupted: checkpoint at update {step} in {ckpt_path}; run again to resume", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    if step < cfg.steps:
        return out / "model"

    if restore_attention is not None:
        restore_attention()
    model_dir = export(model, processor, out / "model")
    if cfg.eval_limit:
        result = evaluate(model, processor, "val", limit=cfg.eval_limit)
        log({"step": step, "eval": {k: result[k] for k in ("n", "accuracy", "per_type")}})
        print(f"final val ({cfg.eval_limit} images): {format_eval(result)}", file=sys.stderr)
    plot_loss(log_path, out / "loss.png")
    return model_dir


def export(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: Path) -> Path:
    """``save_pretrained`` model (float32, safetensors, CPU tensors) and processor into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Command line: ``vlmzip lab train``


def _field_type(f: dataclasses.Field[Any]) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return type(default)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on ``subparsers`` (e.g. the ``lab`` command's); one flag per TrainConfig field."""
    p = subparsers.add_parser("train", help="train the lab mini-VLM from scratch (resumable)")
    p.add_argument("--out", default="runs/lab", help="run folder: checkpoint/, log.jsonl, loss.png, model/")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None, metavar="BOOL")
        elif kind is tuple:
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), default=None, metavar="N,N,..")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"default: {getattr(TrainConfig(), f.name)}")
    p.set_defaults(func=cmd_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig with the flags that were given; the other fields keep their defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    return TrainConfig(**given)


def cmd_train(args: argparse.Namespace) -> int:
    """``vlmzip lab train``: train, print where the model is; 130 after Ctrl-C (checkpoint kept)."""
    cfg = config_from_args(args)
    try:
        model_dir = train(args.out, cfg, resume=not args.no_resume)
    except KeyboardInterrupt:
        return 130
    print(f"model: {model_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmzip.lab.train [flags]``: the same as ``vlmzip lab train``."""
    parser = argparse.ArgumentParser(prog="vlmzip lab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "IGNORE_INDEX", "PRECISIONS", "RUNTIME_FIELDS", "Batch", "TrainConfig", "add_parser", "autocast", "batches",
    "build_llava", "cmd_train", "config_from_args", "drop_start", "eager_attention", "encode_conversation",
    "evaluate", "export", "format_eval", "image_sample", "image_tokens", "kept_patches", "lab_words", "losses",
    "lr_at", "make_batch", "model_config", "named_objects", "owner_words", "patch_owners", "pixel_values",
    "plot_loss", "scene_config", "scene_scale", "shuffled", "to_uint8", "train",
]  # fmt: skip

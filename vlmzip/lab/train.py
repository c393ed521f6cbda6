"""Train the lab mini-VLM: ``vlmzip lab train [--out DIR]``. This module: the loop, checkpoints, logs,
the quick val monitor, export and the command line.

The model is ``build_llava`` (CLIP ViT with CLS -> 2-layer GELU MLP -> Llama decoder, LLaVA-1.5 layout:
features from vision layer -2, CLS dropped) trained from scratch on the procedural scenes of
``vlmzip.lab.scenes``. Default: 336 px, patch 21, 256 patch tokens + CLS (LLaVA-1.5's patch 14 / 576
tokens does not fit the 60-minute CPU budget; ``TrainConfig`` says why).

The rest of the training code is in four modules: ``train_config`` (``TrainConfig``, every knob, and what
follows from it alone, plus the command line's flags; free of torch, so that ``vlmzip --help`` answers at
once), ``train_data`` (the batch of every update, a pure function of config and step: packed multi-turn
conversations, curriculum, patch targets, token-count augmentation), ``train_losses`` (answer, dense
auxiliary and attention losses, and a continuation's distillation anchor, ``--distill``) and ``train_mix``
(the mixture augmentation's pure tensor functions, ``--mix``: shortened images built like the methods
build them). ``--init-from`` starts a continuation phase from a saved model (``--freeze-vision``: tower
frozen).

Four training-only aids, all knobs of ``TrainConfig`` (the exported model is a plain LLaVA either way):
a size curriculum (big objects first, the benchmark's scenes from half-way on), a dense auxiliary loss
(the LM head names what every image-token position shows: colour + shape word, the written word, or
background) and attention supervision (at every answer, one LM layer is trained to look at the patches
of what the question names, read off the scene graph: ``train_data.named_objects``,
``train_data.patch_owners``), plus an optional token-count augmentation (random subsets of an image's
patches reach the LM: ``train_data.kept_patches``).

The defaults are the recipe of the shipped checkpoint's base run; both stages of that recipe, their
training time and accuracy are in docs/lab-model.md.

Outputs in ``out_dir``: ``checkpoint/state.pt`` (model, optimizer, RNG, step; written every
``checkpoint_every`` updates and on Ctrl-C), ``log.jsonl`` (loss, lr, grad norm, throughput, evals),
``loss.png``, ``train_config.json`` and ``model/`` (``save_pretrained`` of model + processor: loads with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``, offline).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlmzip.builders.llava import build_llava
from vlmzip.eval.scorers import score_records
from vlmzip.io import generate_answers
from vlmzip.lab import scenes
from vlmzip.lab.train_config import (  # torch-free, so that the CLI builds its parser without torch
    LATE_FIELDS,
    PRECISION_NAMES,
    RUNTIME_FIELDS,
    TrainConfig,
    config_from_args,
    lr_at,
    model_config,
)
from vlmzip.lab.train_config import add_parser as _add_parser
from vlmzip.lab.train_data import Batch, batches, drop_start
from vlmzip.lab.train_losses import eager_attention, loss_terms

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}  # TrainConfig.precision -> autocast dtype
assert tuple(sorted(PRECISIONS)) == tuple(sorted(PRECISION_NAMES))
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = _fingerprint(cfg)
    saved = {**asdict(TrainConfig()), **saved}  # a field missing from the checkpoint's config ran at its default
    before = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k not in RUNTIME_FIELDS}
    diff = [f"{k}: checkpoint {before[k]!r} vs now {v!r}" for k, v in now.items() if before[k] != v]
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


def _read_state(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint version {state.get('version')!r}")
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; return its step."""
    state = _read_state(path)
    _check_resumable(state["config"], cfg)
    return _restore(state, model, optimizer)


def first_augmented(cfg: TrainConfig) -> int:
    """The first update that the late-phase fields (``LATE_FIELDS``) can change: the augmentation's start,
    or ``steps`` for a run without augmentation."""
    return drop_start(cfg) if (cfg.drop_prob > 0 or cfg.mix) and drop_start(cfg) < cfg.steps else cfg.steps


def branch_checkpoint(source: Path) -> Path:
    """The checkpoint file of ``--branch-from``: a run folder (its ``checkpoint/state.pt``) or the file."""
    path = source / "checkpoint" / "state.pt" if source.is_dir() else source
    if not path.is_file():
        raise ValueError(f"--branch-from {source}: no checkpoint there; pass a run folder of `vlmzip lab train` "
                         "(e.g. one trained with --stop-after at its augmentation's first update)")
    return path


def load_branch(source: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> int:
    """Start a branch from another run's checkpoint (weights, AdamW state, RNG, step); return its step.

    Exact only when every update the checkpoint holds is one the branch's own config would have made: the
    configs may differ in ``LATE_FIELDS`` only, and the checkpoint must precede both runs' augmentation
    (``first_augmented``). Anything else is refused with what differs.
    """
    path = branch_checkpoint(source)
    state = _read_state(path)
    saved = TrainConfig(**{k: v for k, v in state["config"].items() if k != "branch_from"})
    ignore = RUNTIME_FIELDS | LATE_FIELDS | {"branch_from"}
    now, before = asdict(cfg), asdict(saved)
    diff = [f"{k}: {before[k]!r} there vs {now[k]!r} here" for k in now if k not in ignore and before[k] != now[k]]
    if diff:
        raise ValueError(f"--branch-from {path}: that run differs in more than the late-phase fields "
                         f"{sorted(LATE_FIELDS)} (" + "; ".join(diff) + "); give the same flags as that run")
    step, limit = int(state["step"]), min(first_augmented(saved), first_augmented(cfg))
    if step > limit:
        raise ValueError(f"--branch-from {path}: its checkpoint is at update {step}, past update {limit}, where "
                         "the augmentation starts; branch from a checkpoint at or before it (train that run "
                         f"with --stop-after {limit})")
    return _restore(state, model, optimizer)


def _restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
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

    The harness's own answer and score path (``vlmzip.io.generate_answers``, then
    ``vlmzip.eval.scorers.score_records``, as in ``vlmzip eval``), fed with the split's images rendered in
    memory: the runner's loop around it reads a dataset folder from disk and appends resumable
    prediction files, which a monitor called every few hundred updates has no use for. A
    ``vlmzip.compress``-ed model is evaluated compressed. Returns ``score_records``' summary: n,
    accuracy, per_type, per_subtype, pope.
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


@dataclass
class TrainingRun:
    """A run in progress: its folder, what it trains, and how many updates are done."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    optimizer: torch.optim.AdamW
    restore_attention: Callable[[], None] | None  # undoes eager_attention; None without attention supervision
    teacher: LlavaForConditionalGeneration | None = None  # the frozen --init-from model, with cfg.distill
    step: int = 0

    @property
    def checkpoint_path(self) -> Path:
        """The run's checkpoint file, ``out/checkpoint/state.pt``."""
        return self.out / "checkpoint" / "state.pt"

    @property
    def log_path(self) -> Path:
        """The run's log, ``out/log.jsonl``."""
        return self.out / "log.jsonl"

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to ``log.jsonl``."""
        with self.log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint(self) -> None:
        """Write the run's checkpoint at its current update (``save_checkpoint``)."""
        save_checkpoint(self.checkpoint_path, self.step, self.model, self.optimizer, self.cfg)


def init_weights(model: LlavaForConditionalGeneration, folder: Path) -> None:
    """Copy the weights of the model saved in ``folder`` (``save_pretrained``) into ``model``; a clear
    error when the folder holds no such model or its architecture differs from the run's."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"--init-from {folder}: no config.json there; pass a model folder (e.g. "
                         "vlmzip/lab/checkpoint or runs/lab/model)")
    state = LlavaForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).state_dict()
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or wrong:
        raise ValueError(f"--init-from {folder}: its weights do not fit this run's architecture (missing "
                         f"{missing[:3]}, other shape {wrong[:3]}); give the same size flags as that model's run")
    model.load_state_dict({k: state[k] for k in own})


def load_teacher(folder: Path, device: torch.device) -> LlavaForConditionalGeneration:
    """The frozen model of ``folder`` (``--init-from``) in eval mode on ``device``: the distillation teacher."""
    teacher = LlavaForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval()
    return teacher.requires_grad_(False)


def start_run(out: Path, cfg: TrainConfig, resume: bool) -> TrainingRun:
    """Model and optimizer from ``cfg.seed``, or from ``out``'s checkpoint with ``resume``; the log is cut
    back to the checkpoint's update and the config written next to it."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:  # also on GPU: several runs on one machine otherwise oversubscribe its cores
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    # Built on the CPU then moved, so that every device starts from the same weights.
    model, processor = build_llava(None, model_config(cfg))
    if cfg.init_from:
        init_weights(model, Path(cfg.init_from))
    model.to(device).train()
    if cfg.freeze_vision:  # before the optimizer, which takes only trainable parameters
        model.model.vision_tower.requires_grad_(False)
    restore_attention = eager_attention(model) if cfg.attn_weight > 0 else None
    optimizer = make_optimizer(model, cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(Path(cfg.init_from), device) if cfg.distill > 0 else None
    run = TrainingRun(cfg, out, device, model, processor, optimizer, restore_attention, teacher)
    if resume and run.checkpoint_path.exists():
        run.step = load_checkpoint(run.checkpoint_path, model, optimizer, cfg)
        print(f"resumed from {run.checkpoint_path} at update {run.step}/{cfg.steps}", file=sys.stderr)
    elif cfg.branch_from:
        run.step = load_branch(Path(cfg.branch_from), model, optimizer, cfg)
        print(f"branched from {cfg.branch_from} at update {run.step}/{cfg.steps}", file=sys.stderr)
        base_log = branch_checkpoint(Path(cfg.branch_from)).parent.parent / "log.jsonl"
        if base_log.is_file():  # the branch's log and loss plot cover the whole run
            run.log_path.write_text("".join(json.dumps(r) + "\n" for r in _read_log(base_log, run.step)))
    rows = _read_log(run.log_path, up_to_step=run.step)  # drop log lines written after the checkpoint
    run.log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return run


def update(run: TrainingRun, batch: Batch) -> dict[str, float]:
    """One optimizer update on ``batch``; returns its losses (``distill_loss`` only with ``cfg.distill``),
    learning rate and gradient norm."""
    cfg = run.cfg
    lr = lr_at(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with autocast(cfg, run.device):
        answer_loss, aux_loss, attn_loss, distill = loss_terms(
            run.model, run.processor, batch, run.device, cfg.attn_layer if cfg.attn_weight > 0 else None, run.teacher
        )
        loss = answer_loss + cfg.aux_weight * aux_loss + cfg.attn_weight * attn_loss
        if run.teacher is not None:
            loss = loss + cfg.distill * distill
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    stats = {
        "loss": answer_loss.item(),
        "aux_loss": aux_loss.item(),
        "attn_loss": attn_loss.item(),
        "lr": lr,
        "grad_norm": float(grad_norm),
    }
    if run.teacher is not None:
        stats["distill_loss"] = distill.item()
    return stats


class LossMeter:
    """The updates since the last log row and their wall time (evaluations excluded)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the updates so far and restart the clock (after a log row)."""
        self.updates: list[dict[str, float]] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """Time from now on (after an evaluation, whose time is not the updates')."""
        self.start = time.perf_counter()

    def add(self, stats: dict[str, float]) -> None:
        """Record one update's ``update`` stats."""
        self.updates.append(stats)

    def row(self, step: int, batch_size: int) -> dict[str, Any]:
        """Log row: mean losses, the latest update's lr and gradient norm, throughput."""
        elapsed = time.perf_counter() - self.start
        n = len(self.updates)

        def mean(key: str) -> float:
            return sum(u[key] for u in self.updates) / n

        row = {
            "step": step,
            "loss": mean("loss"),
            "aux_loss": mean("aux_loss"),
            "attn_loss": mean("attn_loss"),
            "lr": self.updates[-1]["lr"],
            "grad_norm": self.updates[-1]["grad_norm"],
            "images_per_s": n * batch_size / elapsed,
            "s_per_step": elapsed / n,
        }
        if "distill_loss" in self.updates[-1]:
            row["distill_loss"] = mean("distill_loss")
        return row


def log_eval(run: TrainingRun, label: str) -> None:
    """Score the first ``eval_limit`` val images; log the result and print it after ``label``."""
    result = evaluate(run.model, run.processor, "val", limit=run.cfg.eval_limit)
    run.log({"step": run.step, "eval": {k: result[k] for k in ("n", "accuracy", "per_type")}})
    print(f"{label} {format_eval(result)}", file=sys.stderr)


def progress_bar(cfg: TrainConfig, start: int) -> Any:
    """A tqdm bar over the run's updates, or None without ``cfg.progress``."""
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="upd", dynamic_ncols=True)


def run_updates(run: TrainingRun, end: int) -> None:
    """Update until ``end`` updates are done, logging every ``log_every``, checkpointing every
    ``checkpoint_every`` and at ``end``, scoring val every ``eval_every``. Ctrl-C: checkpoint, re-raise."""
    cfg = run.cfg
    meter = LossMeter()
    bar = progress_bar(cfg, run.step)
    try:
        data = batches(cfg, run.step)
        while run.step < end:
            stats = update(run, next(data))
            meter.add(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.1e}")
            if run.step % cfg.log_every == 0 or run.step == end:
                run.log(meter.row(run.step, cfg.batch_size))
                meter.reset()
            if run.step % cfg.checkpoint_every == 0 or run.step == end:
                run.checkpoint()
            if cfg.eval_every and cfg.eval_limit and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                log_eval(run, f"\nupdate {run.step}: val")
                meter.restart_clock()
    except KeyboardInterrupt:
        run.checkpoint()
        print(
            f"\ninterrupted: checkpoint at update {run.step} in {run.checkpoint_path}; run again to resume",
            file=sys.stderr,
        )
        raise
    finally:
        if bar is not None:
            bar.close()


def finish(run: TrainingRun) -> Path:
    """After the last update: the LM back on its own attention, export to ``out/model``, a final val
    score (with ``eval_limit``) and the loss plot. Returns the model folder."""
    if run.restore_attention is not None:
        run.restore_attention()
    model_dir = export(run.model, run.processor, run.out / "model")
    if run.cfg.eval_limit:
        log_eval(run, f"final val ({run.cfg.eval_limit} images):")
    plot_loss(run.log_path, run.out / "loss.png")
    return model_dir


def train(
    out_dir: str | Path, cfg: TrainConfig | None = None, resume: bool = True, stop_after: int | None = None
) -> Path:
    """Train (or resume) into ``out_dir``; return the exported model folder ``out_dir/model``.

    ``stop_after``: stop (with a checkpoint, without export) once this many updates are done; used to
    simulate an interruption. Ctrl-C also writes a checkpoint before stopping.
    """
    cfg = cfg or TrainConfig()
    run = start_run(Path(out_dir), cfg, resume)
    run_updates(run, cfg.steps if stop_after is None else min(cfg.steps, stop_after))
    if run.step < cfg.steps:
        return run.out / "model"
    return finish(run)


def export(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: Path) -> Path:
    """``save_pretrained`` model (float32, safetensors, CPU tensors) and processor into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Command line: ``vlmzip lab train``


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on ``subparsers`` (e.g. the ``lab`` command's); one flag per TrainConfig field."""
    return _add_parser(subparsers, func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """``vlmzip lab train``: train, print where the model is; 130 after Ctrl-C (checkpoint kept)."""
    cfg = config_from_args(args)
    try:
        model_dir = train(args.out, cfg, resume=not args.no_resume, stop_after=args.stop_after)
    except KeyboardInterrupt:
        return 130
    if args.stop_after is not None and args.stop_after < cfg.steps:
        print(f"stopped after update {args.stop_after}: checkpoint in {Path(args.out) / 'checkpoint'}")
        return 0
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
    "CHECKPOINT_VERSION", "PRECISIONS", "LossMeter", "TrainingRun", "add_parser", "autocast", "branch_checkpoint",
    "cmd_train", "evaluate", "export", "finish", "first_augmented", "format_eval", "init_weights", "load_branch",
    "load_checkpoint", "load_teacher", "log_eval", "main", "make_optimizer", "plot_loss", "progress_bar",
    "run_updates", "save_checkpoint", "start_run", "train", "update",
]  # fmt: skip

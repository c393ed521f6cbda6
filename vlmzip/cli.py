"""The ``vlmzip`` command line: a thin layer over the library API.

torch, transformers and the API are imported inside the commands that run a model, never at import time,
so that ``vlmzip --help`` and every ``vlmzip COMMAND --help`` answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .devices import resolve_device
from .knobs import parse_value, split_knobs, split_methods
from .lab import default_image
from .text import check_utf8

if TYPE_CHECKING:
    from torch import nn

DESCRIPTION = """\
Send a vision-language model far fewer visual tokens, and measure what it costs in accuracy and buys in speed.

examples:
  vlmzip demo                      one lab scene: vanilla vs VisionZip answers, speedup, kept-token picture
  vlmzip run --image FILE --prompt "What is in the image?" --method visionzip --tokens 64
  vlmzip run --method "fastv[layer=3]" --ratio 0.25
  vlmzip eval --methods vanilla,visionzip,random --out runs/eval
  vlmzip bench --model arch:llava-1.5-7b --device cuda --dtype float16
  vlmzip viz --image FILE --methods visionzip,random,spatial --tokens 64
  vlmzip list                      registered methods and their knobs
  vlmzip lab train --out runs/lab  retrain the lab mini-VLM (resumable)
  vlmzip tune --method visionzip --tokens 28 --out runs/vz28   projector fine-tune on compressed tokens

Run "vlmzip COMMAND --help" for the options of a command.
"""
PAPER_BUDGETS_HELP = (
    "budgets, e.g. 192,128,64 (default: the papers' 192,128,64 of LLaVA-1.5's 576 patches, scaled to the "
    "model's patch count: 85,57,28 for the 256-patch lab model)"
)
# run / demo without a budget: the papers' (VisionZip, SparseVLM, FastV) smallest budget, 64 of LLaVA-1.5's 576
PAPER_TOKENS, PAPER_PATCHES = 64, 576
BUDGET_KNOBS = frozenset({"tokens", "ratio", "dominant", "contextual", "tokens_per_frame"})
# the knobs run / demo take as --NAME (--tokens-per-frame for tokens_per_frame: run only)
FLAG_NAMES = ("tokens", "ratio", "dominant", "contextual", "layer", "tokens_per_frame")
# a video without a budget: the papers' Video-LLaVA setting, 17 of each frame's 256 tokens (2,048 -> 136 over 8
# frames; VisionZip, arXiv 2412.04467), as that share of each frame
PAPER_FRAME_TOKENS, PAPER_FRAME_PATCHES = 17, 256
LAYER_RULE = (
    "a decoder layer of the LLM: >= 1 (an in-LLM method scores the tokens with the layer before) and below "
    "the LLM's number of decoder layers"
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and ends each option's help with its default, unless the help already
    says what the default is (options whose default is None describe it in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


# -- argparse types: a bad value is refused while parsing, before any model loads ------------------------------


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def share(text: str) -> float:
    """argparse type of ``--ratio``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1.0 keeps every token), got {text}")
    return value


def layer_index(text: str) -> int:
    """argparse type of ``--layer``: a decoder layer index >= 1 (the upper bound depends on the model)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a decoder layer index (an integer), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be {LAYER_RULE}; got {value}")
    return value


def _method_list(text: str) -> list[str]:
    """argparse type of ``eval --methods``: methods split on the commas outside their bracketed knobs."""
    values = split_methods(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of methods, got {text!r}")
    return values


def _csv(cast: Any) -> Any:
    """argparse type: a comma-separated, non-empty list of ``cast`` values."""

    def parse(text: str) -> list:
        try:
            values = [cast(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} (in {text!r})") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    return parse


# -- checks of run / demo / viz / bench inputs, before any model loads -----------------------------------------


def check_out_file(out: str, flag: str = "--out") -> None:
    """A clear ValueError, before any model loads, when the picture ``out`` cannot be written: its folder is
    missing or not writable, it is a folder, or its extension names no image format."""
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"{flag} {out} is a folder; pass a file path such as {path / 'picture.png'}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {out}: the folder {folder} does not exist; create it first or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {out}: cannot write there (no write permission); choose another path")
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"{flag} {out}: {path.suffix or 'no extension'} names no image format; end it in .png or .jpg")


def _spelled(key: str, value: Any) -> str:
    """A knob as run / demo take it on the command line: ``--tokens 64``, or ``--knob key=value``."""
    return f"--{key.replace('_', '-')} {value}" if key in FLAG_NAMES else f"--knob {key}={value}"


def parse_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """Collect the method knobs given as flags (``--tokens`` etc. and ``--knob k=v``); a knob given twice with
    different values is an error."""
    knobs: dict[str, Any] = {}
    for name in FLAG_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            knobs[name] = value
    for item in getattr(args, "knob", None) or []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--knob expects key=value, got {item!r}")
        value = parse_value(raw.strip())
        if key in knobs and knobs[key] != value:
            raise ValueError(f"{key} is given twice with different values: {_spelled(key, knobs[key])} and "
                             f"--knob {item}; give it once")
        knobs[key] = value
    return knobs


def given_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs of ``vlmzip run`` / ``demo`` as given: the bracketed ones of ``--method`` (``fastv[layer=3]``,
    as ``vlmzip eval`` takes them) merged with the flags. ``args.method`` becomes the bare method name.

    Checked before any model loads: a knob given both ways with different values, and a layer below 1."""
    method, bracketed = split_knobs(args.method)
    flags = parse_knobs(args)
    for key in sorted(bracketed.keys() & flags.keys()):
        if bracketed[key] != flags[key]:
            raise ValueError(f"{key} is given twice with different values: --method {args.method!r} and "
                             f"{_spelled(key, flags[key])}; give it once")
    knobs = {**bracketed, **flags}
    layer = knobs.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool) and layer < 1:
        raise ValueError(f"layer={layer}: a layer must be {LAYER_RULE}")
    args.method = method
    args.given_knobs = knobs  # main() spells the library's errors with them
    return knobs


def method_knobs(args: argparse.Namespace, model: nn.Module, knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs of ``vlmzip run`` / ``demo``: ``knobs`` (see :func:`given_knobs`) as given, or, without a
    budget, the papers' 64 of LLaVA-1.5's 576 patches as the same share of this model's images.

    A model whose images all have one token count gets that share as ``tokens`` (``vlmzip.paper_budget``);
    one whose count depends on the image (LLaVA-NeXT's crops, Qwen2-VL's dynamic resolution) gets it as
    ``ratio``, the same share of each image's own count. The choice is printed."""
    from .api import paper_budget, plan

    if args.method == "vanilla" or BUDGET_KNOBS & set(knobs):
        return knobs
    if getattr(args, "video", None):
        ratio = PAPER_FRAME_TOKENS / PAPER_FRAME_PATCHES
        print(f"budget:  ratio {ratio:.4f} of each frame = the papers' {PAPER_FRAME_TOKENS} of {PAPER_FRAME_PATCHES} "
              "tokens per frame (Video-LLaVA: 2048 -> 136 over 8 frames)")
        return {**knobs, "ratio": ratio}
    if plan(model, "vanilla").vanilla_tokens is not None:
        tokens = paper_budget(model, PAPER_TOKENS)
        if tokens != PAPER_TOKENS:
            from .adapters import adapter_for

            patches = adapter_for(model).unit_layout().num_patches
            print(f"budget:  {tokens} tokens = the papers' {PAPER_TOKENS} of {PAPER_PATCHES}, as the same share of "
                  f"{patches} patches")
        return {**knobs, "tokens": tokens}
    ratio = PAPER_TOKENS / PAPER_PATCHES
    print(f"budget:  ratio {ratio:.4f} = the papers' {PAPER_TOKENS} of {PAPER_PATCHES}, as the same share of each "
          "image's own visual tokens (their count depends on the image with this model)")
    return {**knobs, "ratio": ratio}


def model_name(args: argparse.Namespace) -> str:
    """How the CLI names the model it loaded: the folder given, or the built-in default."""
    return args.model or "built-in lab mini-VLM (vlmzip.lab.load())"


# -- commands ----------------------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """``vlmzip list``: the registered methods and their knobs; ``--archs``: the ``arch:NAME`` speed models."""
    from . import catalog  # the registry as data: no torch import, so the answer is instant

    if args.archs:
        from .builders.registry import arch_names, get_arch

        for name in arch_names():
            arch = get_arch(name)
            print(f"arch:{name:<20} [{arch.family}, {arch.spec.text_layers} decoder layers] {arch.description}")
        return 0
    for method in catalog.read():
        print(f"{method['name']:<12} [{method['stage']}] {method['description']}")
        for knob in method["knobs"]:
            default = "" if knob["default"] is None else f" (default {knob['default']})"
            print(f"    --{knob['name']:<12} {knob['type']:<5} {knob['help']}{default}")
        if method["stage"] == "llm":
            print("    (acts inside the LLM: eval tables give the visual tokens the LLM ends with and their mean "
                  "over decoder layers, the count that compares fairly with pre-LLM budgets)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``vlmzip run``: one question about an image or a video answered vanilla and compressed, with both times to
    first token."""
    from .compare import compare_answers, describe
    from .io import load_model, read_image
    from .lab import scenes
    from .video import DEFAULT_FRAMES, read_video

    knobs = given_knobs(args)
    check_utf8(args.prompt, "--prompt")
    if args.image and args.video:
        raise ValueError("give --image or --video, not both")
    if args.frames is not None and not args.video:
        raise ValueError("--frames sets how many frames of a --video are sampled; add --video FILE_OR_FOLDER")
    if "tokens_per_frame" in knobs and not args.video:
        raise ValueError("--tokens-per-frame budgets the frames of a --video; for an image pass --tokens")
    if "tokens_per_frame" in knobs and "tokens" in knobs:
        raise ValueError("give --tokens (per video) or --tokens-per-frame, not both")
    if args.video:
        if args.prompt is None:
            raise ValueError("--prompt is required with --video (the question to ask about your video)")
        visual = read_video(args.video, args.frames or DEFAULT_FRAMES)
        prompt = args.prompt
        source = f"{args.video}: {len(visual)} of {visual.total} frames, numbers {list(visual.indices)}"
    elif args.image:
        visual = read_image(args.image)
        if args.prompt is None:
            raise ValueError("--prompt is required with --image (the question to ask about your image)")
        prompt, source = args.prompt, args.image
    else:  # a test scene of the lab benchmark, with its own first question unless --prompt is given
        visual, _, qas = scenes.sample(scenes.SPLITS["test"].seed, 0)
        prompt, source = args.prompt or qas[0].question, "lab test scene 0"
    model, processor = load_model(args.model, device=resolve_device(args.device), dtype=args.dtype)
    result = compare_answers(model, processor, visual, prompt, args.method, method_knobs(args, model, knobs),
                             repeats=args.repeats, max_new_tokens=args.max_new_tokens)
    print(f"model:   {model_name(args)}  [{type(model).__name__}]")
    print(f"{'video' if args.video else 'image'}:   {source}")
    print(f"prompt:  {prompt}")
    print(describe(result, args.method, args.repeats))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``vlmzip demo``: a lab scene answered vanilla and compressed, and the picture of the kept tokens."""
    from .compare import compare_answers, describe
    from .io import load_model
    from .lab import scenes
    from .viz import figure, legend_order, method_label, method_panel, plain_picture, view_of

    knobs = given_knobs(args)
    check_out_file(args.out)
    image, _, qas = scenes.sample(scenes.SPLITS["test"].seed, args.index)
    wanted = [q for q in qas if q.type == args.type] if args.type else qas
    if not wanted:
        raise ValueError(f"test scene {args.index} has no {args.type!r} question; try another --index")
    qa = wanted[0]
    model, processor = load_model(args.model, device=resolve_device(args.device), dtype=args.dtype)
    knobs = method_knobs(args, model, knobs)
    result = compare_answers(model, processor, image, qa.question, args.method, knobs,
                             repeats=args.repeats, max_new_tokens=args.max_new_tokens)
    print(f"model:   {model_name(args)}  [{type(model).__name__}]")
    print(f"scene:   lab test image {args.index}; question type {qa.type}")
    print(f"question: {qa.question}   (correct answer: {qa.answer!r})")
    print(describe(result, args.method, args.repeats))

    view = view_of(model, processor, image, qa.question)
    caption, picture, keys = method_panel(model, view, args.method, knobs)
    headline = caption.split("\n")[0]
    title = (f"{headline}\nlab test scene {args.index}: {qa.question} (correct: {qa.answer}); answers: vanilla "
             f"{result.vanilla_answer!r}, {method_label(args.method)} {result.method_answer!r}")
    panels = [(view.caption, plain_picture(view)), (caption, picture)]
    figure(panels, title, legend_order(keys)).save(args.out)
    if keys:
        print(f"kept tokens drawn over the image: {args.out}")
    else:
        print(f"{args.method} keeps every token before the LLM (nothing to draw); picture: {args.out}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    """``vlmzip viz``: the tokens each method sends to the LLM, side by side over the image."""
    from .io import load_model, read_image
    from .lab import scenes
    from .methods import get_method
    from .viz import methods_figure

    device = resolve_device(args.device)
    check_out_file(args.out)
    for method in args.methods:
        get_method(split_knobs(method)[0])  # an unknown name fails before the model loads
    if args.image:
        image, source = read_image(args.image), args.image
    else:
        image, source = scenes.sample(scenes.SPLITS["test"].seed, 3)[0], "lab test scene 3"
    model, processor = load_model(args.model, device=device, dtype=args.dtype)
    picture, tokens = methods_figure(model, processor, image, args.methods, args.tokens, source)
    picture.save(args.out)
    print(f"model:   {model_name(args)}  [{type(model).__name__}]")
    print(f"image:   {source}")
    print(f"{', '.join(args.methods)} at {tokens} visual tokens per image drawn side by side: {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.runner import evaluate
    from .eval.runs import EvalConfig

    cfg = EvalConfig(
        data=args.data, out=args.out, model=args.model, methods=args.methods, tokens=args.tokens,
        limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, match=args.match,
        device=resolve_device(args.device), dtype=args.dtype, multi_turn=args.multi_turn,
        turn2_from_scratch=args.turn2_from_scratch, frames=args.frames, tokens_per_frame=args.tokens_per_frame,
    )
    if args.turn2_from_scratch and not args.multi_turn:
        raise ValueError("--turn2-from-scratch is a --multi-turn option; add --multi-turn")
    evaluate(cfg)  # sharded over the processes of torchrun / accelerate launch, when started by one
    if _rank() == 0:
        print((Path(args.out) / "table.md").read_text())
        plot = "" if args.multi_turn else " plot.png,"
        print(f"wrote {args.out}/results.json, table.md,{plot} and predictions/*.jsonl")
    return 0

def _launch(name: str, default: int) -> int:
    """``RANK`` / ``WORLD_SIZE`` as set by a launcher (torchrun, accelerate launch); ``default`` without one."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def _rank() -> int:
    return _launch("RANK", 0)


def _eval_of_same_model(run_dir: str, model: Any) -> dict:
    """The eval results.json in ``run_dir``, refused unless it evaluated these very weights."""
    from .bench.plots import read_eval
    from .eval.outdir import weights_sha256

    results = read_eval(run_dir)
    theirs = results.get("identity", {}).get("weights_sha256")
    if theirs is not None and theirs != weights_sha256(model):
        raise ValueError(f"--eval {run_dir} evaluated other weights ({results['identity'].get('model')}, "
                         f"{results['identity'].get('dtype')}); bench the model and --dtype that eval ran")
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    if args.engine == "vllm":  # vLLM's own venv (tools/install-vllm.sh): requests/s, TTFT, KV blocks under load
        from .vllm.bench import run

        return run(args)
    import torch
    from tqdm.auto import tqdm

    from .adapters import adapter_for
    from .api import PAPER_BUDGETS, paper_budget, plan
    from .bench import bench_prefill, format_rows, write_json
    from .bench.memory import ChildSpec
    from .bench.plots import plot_pareto, plot_speedups
    from .bench.video import bench_frames, synthetic_clip, video_inputs
    from .io import batch_inputs, load_model

    if args.eval and not args.out:
        raise ValueError("--eval needs --out DIR: the Pareto plot is written to DIR/pareto.png")
    check_utf8(args.prompt, "--prompt")
    args.device = resolve_device(args.device)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype, layers=args.layers)
    image = default_image()
    if args.image_size:
        image = image.resize((args.image_size, args.image_size))
    if args.tokens and args.ratios:
        raise ValueError("give --tokens or --ratios, not both")
    if args.ratios or (not args.tokens and plan(model, "vanilla").vanilla_tokens is None):
        # per-image budgets: a share of each image's own count (the default where counts depend on the image)
        ratios = args.ratios or [t / PAPER_PATCHES for t in PAPER_BUDGETS]
        budgets = [{"ratio": r} for r in ratios]
    else:
        budgets = [{"tokens": t} for t in args.tokens or [paper_budget(model, t) for t in PAPER_BUDGETS]]
    runs = [(name, {**knobs, **b}) for name, knobs in map(split_knobs, args.methods) for b in budgets]

    frames = bench_frames(adapter_for(model), args.frames)

    def make_inputs(batch_size: int) -> dict:
        if frames is not None:
            return video_inputs(processor, [synthetic_clip(image, frames)] * batch_size, [args.prompt] * batch_size,
                                model)
        return batch_inputs(processor, [image] * batch_size, [args.prompt] * batch_size, model)

    results = _eval_of_same_model(args.eval, model) if args.eval else None
    child = None
    if args.peak_memory == "child":
        child = ChildSpec(args.model, args.device, args.dtype, args.layers, args.image_size, args.prompt, 1,
                          frames=frames)
    total = len(args.batch_sizes) * len(runs) * (args.repeats + 1)
    quiet = args.quiet or not sys.stderr.isatty()
    with tqdm(total=total, unit="round", desc="vlmzip bench", disable=quiet, dynamic_ncols=True) as bar:
        rows = bench_prefill(model, make_inputs, runs, args.batch_sizes, repeats=args.repeats,
                             progress=bar.update, compile=args.compile or False, child=child)
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    if args.compile:
        eager = sorted({r.method for r in rows if not r.compiled})
        print(f"--compile: language model torch.compile'd ({args.compile}), static KV cache"
              + (f"; in-LLM methods run eager on both sides: {', '.join(eager)}" if eager else ""))
    depth = "" if args.layers is None else f", LLM reduced to {args.layers} decoder layers (cost per layer is uniform)"
    size = f"{image.width}x{image.height}"
    print(f"model: {model_name(args)} ({args.dtype}{depth}); " + (f"video of {frames} frames of {size}" if frames
                                                                   else f"image {size}"))
    print(format_rows(rows, plan(model, "vanilla").tokens, args.repeats, device))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["vlmzip", *getattr(args, "argv", sys.argv[1:])])
        write_json(rows, out / "bench.json", device=device, command=command,
                   model=model_name(args), dtype=args.dtype, layers=args.layers, repeats=args.repeats,
                   image_size=[image.width, image.height], vanilla_tokens=plan(model, "vanilla").tokens,
                   frames=frames)
        plot_speedups(rows, out / "speedup.png", title=model_name(args))
        print(f"wrote {out / 'bench.json'} and {out / 'speedup.png'}")
        if results is not None:
            plot_pareto(rows, results, out / "pareto.png")
            print(f"wrote {out / 'pareto.png'} (accuracy from {args.eval})")
    return 0


def cmd_lab_train(args: argparse.Namespace) -> int:
    """``vlmzip lab train``: checks --device, then trains (``vlmzip.lab.train.cmd_train``)."""
    if args.device is not None:
        resolve_device(args.device)
    from .lab import train

    return train.cmd_train(args)


def cmd_tune(args: argparse.Namespace) -> int:
    """``vlmzip tune``: projector fine-tune on compressed tokens (``vlmzip.lab.tune``); prints the folder."""
    from .lab.tune import TuneConfig, tune

    cfg = TuneConfig(method=args.method, tokens=args.tokens, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed)
    print(f"tuned model: {tune(args.model, args.out, cfg, device=resolve_device(args.device))}")
    return 0


# -- the parser: one function per command, in the order of `vlmzip --help` ---------------------------------------


def _command(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """A sub-command whose description is its one-line summary as a sentence."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          formatter_class=HelpFormatter)


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """``--method`` and its knobs (run, demo)."""
    parser.add_argument("--method", default="visionzip",
                        help='a registered method (see "vlmzip list"), optionally with knobs in brackets: '
                        '"fastv[layer=3]"')
    parser.add_argument("--tokens", type=positive_int,
                        help="visual tokens per image sent to the LLM, per video with --video (default: 64 of 576, "
                        "scaled to the model; on models whose images differ in token count, that share of each "
                        "image's; a video: 17 of each frame's 256 as a share, the papers' Video-LLaVA setting)")
    parser.add_argument("--ratio", type=share,
                        help="or: that share of each image's visual tokens, 0 < r <= 1 (default: none)")
    parser.add_argument("--dominant", type=positive_int,
                        help="VisionZip: dominant tokens, CLS included (default: from --tokens)")
    parser.add_argument("--contextual", type=non_negative_int,
                        help="VisionZip: contextual tokens (default: from --tokens)")
    parser.add_argument("--layer", type=layer_index,
                        help="in-LLM methods (fastv): prune from decoder layer K on (default: the method's, 2)")
    parser.add_argument("--knob", action="append", metavar="KEY=VALUE",
                        help="any other method knob, repeatable (default: none)")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``."""
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype the model runs in")


def add_list_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip list``."""
    p = _command(sub, "list", "list registered methods and their knobs")
    p.add_argument("--archs", action="store_true",
                   help="list the arch:NAME models instead (real architectures with random weights, for bench)")
    p.set_defaults(func=cmd_list)


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip run``."""
    p = _command(sub, "run", "answer one question vanilla and compressed; compare time to first token")
    p.add_argument("--model",
                   help="checkpoint folder, or arch:llava-1.5-7b (random weights) (default: the lab mini-VLM)")
    p.add_argument("--image", help="image file (default: a procedural lab scene)")
    p.add_argument("--video", metavar="FILE_OR_FOLDER",
                   help="a video file (decoded with PyAV) or a folder of frame images, instead of --image "
                   "(default: none)")
    p.add_argument("--frames", type=positive_int,
                   help="frames sampled from --video, uniformly: the centres of equal segments (default: 8, the "
                   "papers' Video-LLaVA setting)")
    p.add_argument("--prompt",
                   help="the question (default: the lab scene's own question; needed with --image and --video)")
    add_method_args(p)
    p.add_argument("--tokens-per-frame", type=positive_int,
                   help="with --video: visual tokens per frame sent to the LLM, instead of --tokens per video "
                   "(default: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="length limit of each answer")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per side (median reported)")
    add_device_args(p)
    p.set_defaults(func=cmd_run)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip demo``."""
    p = _command(sub, "demo", "one lab scene: vanilla vs compressed answers, speedup, kept-token picture")
    p.add_argument("--model", help="checkpoint folder (default: the lab mini-VLM)")
    p.add_argument("--index", type=int, default=3, help="which test-split scene")
    p.add_argument("--type", choices=["presence", "count", "color", "shape", "spatial", "text", "detail"],
                   help="question type to ask (default: the scene's first question)")
    add_method_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="length limit of each answer")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per side (median reported)")
    p.add_argument("--out", default="vlmzip-demo.png", help="where to write the kept-token picture")
    add_device_args(p)
    p.set_defaults(func=cmd_demo)


def add_viz_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip viz``."""
    p = _command(sub, "viz", "draw what each method sends to the LLM, side by side, over the image the model sees")
    p.add_argument("--model", help="checkpoint folder (default: the lab mini-VLM)")
    p.add_argument("--image", help="image file (default: lab test scene 3, the demo's)")
    p.add_argument("--methods", type=_method_list, default="visionzip,random,spatial",
                   help="comma-separated methods, one panel each, each with optional knobs in brackets "
                   "(fastv[layer=3])")
    p.add_argument("--tokens", type=positive_int,
                   help="visual tokens per image sent to the LLM (default: the papers' 64 of 576, as the same share "
                   "of the image's own visual tokens)")
    p.add_argument("--out", default="vlmzip-viz.png", help="where to write the picture")
    add_device_args(p)
    p.set_defaults(func=cmd_viz)


def add_lab_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip lab train`` (its flags come from ``vlmzip.lab.train_config``)."""
    from .lab import train_config

    p = _command(sub, "lab", "the offline lab: train the mini-VLM")
    lab_commands = p.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    train_config.add_parser(lab_commands, func=cmd_lab_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip eval``."""
    p = _command(sub, "eval", "accuracy of methods x budgets vs vanilla on a dataset")
    p.add_argument("--model", help="checkpoint folder (default: the lab mini-VLM)")
    p.add_argument("--data", default="lab-test",
                   help="dataset folder, or lab-test / lab-val / lab-test-small (images), lab-video / lab-video-val "
                   "(clips of moving shapes)")
    p.add_argument("--methods", type=_method_list, default="vanilla,visionzip",
                   help="comma-separated methods or compositions (visionzip@128+fastv: VisionZip to the "
                   "papers' 128 of 576, then fastv at each budget), each with optional knobs in brackets "
                   "(cluster_saliency[variant=2], sparsevlm[version=2.0,recycle=none]); vanilla is always "
                   "evaluated, once, as the reference")
    p.add_argument("--tokens", type=_csv(int),
                   help=PAPER_BUDGETS_HELP.replace("budgets,", "budgets per image (per video for videos),", 1))
    p.add_argument("--tokens-per-frame", type=_csv(positive_int),
                   help="budgets per video frame, e.g. 28,17, swept after --tokens (default: none; on a dataset of "
                   "videos without --tokens, the papers' budgets per frame)")
    p.add_argument("--frames", type=positive_int,
                   help="frames sampled per video, uniformly: the centres of equal segments (default: 6 for the lab "
                   "video splits, which fits the lab model's context, else 8)")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=int, default=8, help="length limit of each answer")
    p.add_argument("--match", default="exact", choices=["exact", "relaxed"],
                   help="exact: normalised answer equals a gold answer; relaxed: or starts with one")
    p.add_argument("--multi-turn", action="store_true",
                   help="two questions about different objects of one image per conversation, turn 2 "
                   "continuing turn 1's KV cache; --limit counts conversations")
    p.add_argument("--turn2-from-scratch", action="store_true",
                   help="with --multi-turn: recompute turn 2 from its full prompt and the image instead of "
                   "turn 1's cache (in-LLM methods then choose their tokens for question 2): the control")
    p.add_argument("--out", required=True,
                   help="output folder, new or empty, or one of this evaluation (rerun the same command to "
                   "resume; required)")
    add_device_args(p)
    p.epilog = (
        "over several GPUs (or CPU processes), each process a share of the questions, results merged by the "
        "first:\n  torchrun --nproc_per_node N -m vlmzip.cli eval ...   (or: accelerate launch --multi_gpu "
        "--num_processes N -m vlmzip.cli eval ...)"
    )
    p.set_defaults(func=cmd_eval)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip bench``."""
    p = _command(sub, "bench", "prefill / time-to-first-token speedups vs vanilla, with the ideal")
    p.add_argument("--model", help="checkpoint folder or arch:llava-1.5-7b (default: the lab mini-VLM)")
    p.add_argument("--methods", type=_method_list, default="visionzip",
                   help="comma-separated methods to time, each with optional knobs in brackets (fastv[layer=3])")
    p.add_argument("--tokens", type=_csv(int), help=PAPER_BUDGETS_HELP)
    p.add_argument("--ratios", type=_csv(share),
                   help="budgets as shares of each image's own count, e.g. 0.25,0.1 (default for models whose images "
                   "have their own counts: the papers' 192,128,64 of 576 as shares)")
    p.add_argument("--batch-sizes", type=_csv(positive_int), default="1,8",
                   help="comma-separated batch sizes (images per prefill)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed repeats per configuration (median)")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="arch:NAME only: build the LLM with N decoder layers (default: all of them)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="resize the timed image to N x N pixels (default: the lab scene's 336)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="time a video: a synthetic clip of F frames (the image moving) on a model whose adapter "
                   "compresses videos (default: a video model's own clip length, e.g. Video-LLaVA's 8; else an image)")
    p.add_argument("--prompt", default="What color is the small object?", help="the question sent with each image")
    p.add_argument("--out", default=None,
                   help="also write DIR/bench.json (one object per row) and DIR/speedup.png "
                   "(default: print the table only)")
    p.add_argument("--eval", default=None, metavar="RUN_DIR",
                   help="a vlmzip eval --out folder of the same model: with --out, also DIR/pareto.png "
                   "(accuracy vs time to first token per method; default: none)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the language model (backend, default inductor; on CUDA with CUDA "
                   "graphs) and use a static KV cache, vanilla and method alike (in-LLM methods run "
                   "eager); the first round compiles (default: eager, dynamic KV cache)")
    p.add_argument("--peak-memory", choices=["process", "child"], default="process",
                   help="CPU peak memory: this process's peak (fast, noisy) or each configuration in a "
                   "fresh child process (slower: loads the model once per configuration; default: process)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: a bar on stderr when it is a terminal)")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: serve the model in vLLM with the vlmzip plugin and measure requests/s, time to first "
                   "token and KV-cache blocks at --concurrency (vanilla and each method in one run; needs vLLM "
                   "installed; default: transformers prefill timing)")
    p.add_argument("--concurrency", type=_csv(positive_int), default="1,8,32",
                   help="--engine vllm: requests submitted together (default: 1,8,32)")
    p.add_argument("--new-tokens", type=positive_int, default=16,
                   help="--engine vllm: tokens generated per request (default: 16)")
    add_device_args(p)
    p.set_defaults(func=cmd_bench)


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    """``vlmzip tune``."""
    p = _command(sub, "tune", "fine-tune only the projector on a pre-LLM method's compressed tokens, "
                 "VisionZip-tuned (VisionZip, arXiv 2412.04467); save a plain model to use compressed")
    p.add_argument("--model", help="checkpoint folder (default: the lab mini-VLM)")
    p.add_argument("--method", default="visionzip", help="a pre-LLM method (default: %(default)s)")
    p.add_argument("--tokens", type=positive_int, required=True, help="visual tokens per image to tune for")
    p.add_argument("--out", required=True, help="folder of the tuned model (+ tune.json, log.jsonl)")
    p.add_argument("--steps", type=positive_int, default=100, help="updates (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="lab train images per update, all their questions (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-5,
                   help="AdamW learning rate (default: %(default)s, VisionZip's projector fine-tune)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (float32 weights)")
    p.set_defaults(func=cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; builds without importing torch or transformers."""
    parser = argparse.ArgumentParser(prog="vlmzip", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_list_parser, add_run_parser, add_demo_parser, add_viz_parser, add_lab_parser, add_eval_parser,
                add_bench_parser, add_tune_parser):
        add(sub)
    return parser


# -- errors and exit codes ---------------------------------------------------------------------------------------

FLAG_KNOBS = FLAG_NAMES  # the knobs run / demo take as flags


def as_flags(message: str, knobs: dict[str, Any] | None = None) -> str:
    """A library error in the command line's words: ``tokens=100000`` becomes ``--tokens 100000``, and
    VisionZip's ``dominant + contextual = 310`` becomes ``--dominant 300 + --contextual 10 = 310`` (the values
    from ``knobs``, the knobs the command was given). Knobs in a method's brackets (``fastv[layer=3]``) and
    after ``--knob`` stay as they are."""
    knobs = knobs or {}

    def visionzip_pair(match: re.Match) -> str:
        dominant, contextual = knobs.get("dominant"), knobs.get("contextual")
        if dominant is None:
            return f"--dominant + --contextual = {match[1]}"
        return f"--dominant {dominant} + --contextual {contextual or 0} = {match[1]}"

    message = re.sub(r"(?<![\w-])dominant \+ contextual ?= ?(\d+)", visionzip_pair, message)
    message = re.sub(r"(?<![\w-])dominant \+ contextual <=", "--dominant + --contextual <=", message)
    for knob in FLAG_KNOBS:
        flag = knob.replace("_", "-")
        message = re.sub(rf"(?<![\w\-\[,])(?<!--knob ){knob}=(\S+)", rf"--{flag} \1", message)
        message = re.sub(rf"(?<![\w-]){knob} <=", f"--{flag} <=", message)
    return message


def _quiet_stdout() -> None:
    """Point stdout at the null device once its reader has gone (``vlmzip list | head -1``), so that the
    interpreter's final flush of what is still buffered does not fail a second time."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's captured stdout)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmzip`` command; returns the exit code: 2 with a message on bad input (argparse's
    usage errors included), 130 after Ctrl-C, 0 when the reader of its output stops early (``| head``)."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader gone early shows here, while it can still be caught
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error argparse has already printed (2)
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    args.argv = argv
    try:
        return args.func(args)
    except ValueError as err:
        if not getattr(err, "relayed", False):  # an error of rank 0 relayed to the other processes: said once
            print(f"vlmzip {args.command}: error: {as_flags(str(err), getattr(args, 'given_knobs', None))}",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _rank() != 0:
            return 130
        message = f"\nvlmzip {args.command}: interrupted"
        if args.command == "eval" and _launch("WORLD_SIZE", 1) > 1:
            message += (f"; the answers so far are kept in {args.out}/predictions. To resume, rerun the same "
                        "torchrun / accelerate launch command (with any number of processes)")
        elif args.command == "eval":
            message += (f"; the answers so far are kept in {args.out}/predictions. To resume, rerun the same "
                        f"command:\n  {shlex.join(['vlmzip', *argv])}")
        print(message, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

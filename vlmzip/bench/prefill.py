"""Prefill benchmark: forward (vision + compression + LLM prefill) and time to first token through
``generate``, vanilla vs each method x budget, interleaved in one run, medians, ratios to vanilla;
plus the ideal speedup from counting the LLM's multiply-adds at the real shapes."""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for
from ..api import STATE_ATTR, compressed, plan
from .compiled import compilable, compiled
from .memory import ChildSpec, child_peak_memory, peak_memory
from .timing import interleaved, timed


def layer_macs(n: int, text_config: Any) -> float:
    """Multiply-adds of one Llama-style decoder layer over ``n`` tokens (one sequence).

    q/o projections 2*n*d^2, k/v projections 2*n*d*d_kv, scores and weighted sum 2*n^2*d, gated MLP
    3*n*d*m. (VisionZip's formula T*(4nd^2 + 2n^2d + 2ndm) is the same with d_kv = d and a 2-matrix MLP.)
    """
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    d_kv = d * getattr(text_config, "num_key_value_heads", heads) // heads
    m = text_config.intermediate_size
    return float(2 * n * d * d + 2 * n * d * d_kv + 2 * n * n * d + 3 * n * d * m)


def llm_prefill_macs(seq_len: int | list[int], text_config: Any) -> float:
    """Multiply-adds of the decoder prefill: ``seq_len`` tokens in every layer, or a list with each layer's
    token count (in-LLM methods prune between layers)."""
    lengths = seq_len if isinstance(seq_len, list) else [seq_len] * text_config.num_hidden_layers
    return sum(layer_macs(n, text_config) for n in lengths)


def prefill_lengths(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[int]:
    """Each decoder layer's sequence length in one prefill of ``inputs`` (read off its KV cache)."""
    return [int(layer.keys.shape[2]) for layer in prefill_cache(model, inputs).layers]


def prefill_cache(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """The KV cache (a DynamicCache) that one prefill of ``inputs`` leaves: ``generate(max_new_tokens=1)``."""
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    return out.cache


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of every layer's keys + values (in-LLM methods: later layers hold fewer tokens)."""
    return sum(int(layer.keys.nbytes) + int(layer.values.nbytes) for layer in cache.layers)


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU fused attention (FlopCounterMode counts only the CUDA kernels): scores and weighted
    sum, 2 * 2 * b * h * s_q * s_k * d, the full square as the analytic formula counts it."""
    batch, heads, queries, dim = query
    return 4 * batch * heads * queries * key[-2] * dim


@dataclass
class FlopCount:
    """Counted FLOPs of one call: all of them, and the LLM decoder layers' share."""

    total: int
    llm_layers: int


def count_flops(model: nn.Module, fn: Callable[[], Any]) -> FlopCount:
    """FLOPs of ``fn()`` (e.g. one forward: vision tower, projector, method, LLM, head) counted by
    ``torch.utils.flop_counter.FlopCounterMode``: matrix multiplies, convolutions and attention, 2 per
    multiply-add; elementwise ops are not counted. ``llm_layers``: the decoder layers' part."""
    from torch.utils.flop_counter import FlopCounterMode

    state = getattr(model, STATE_ATTR, None)
    lm = (state.adapter if state is not None else adapter_for(model)).language_model()
    lm_name = next(name for name, module in model.named_modules() if module is lm)
    layer = re.compile(rf"^{re.escape(type(model).__name__)}\.{re.escape(lm_name)}\.layers\.\d+$")
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    counts = counter.get_flop_counts()
    return FlopCount(
        total=int(counter.get_total_flops()),
        llm_layers=int(sum(sum(ops.values()) for name, ops in counts.items() if layer.match(name))),
    )


DECODE_TOKENS = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall seconds spent inside wrapped calls (CUDA synchronised around each on a GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds += time.perf_counter() - start

        return timed_call


_ABSENT = object()


def compression_overhead(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, str] | None:
    """Compression time as a share of the stage it shortens, in one forward of a compressed ``model``:
    ``(share, "vision_tower")`` or ``(share, "llm")``; None for the vanilla model.

    Pre-LLM methods: the method's ``state.select`` (selection / merging) + the adapter's signal capture
    (its ``tower.run`` minus the tower module's own forward, ``adapter.vision_module()``: hooks' q/k turned
    into attention, keys, seeds), over the vision tower module's forward (a model with a video tower of its
    own: both towers'). In-LLM methods (no pre-LLM stage):
    the pruner's work before each decoder layer (``Pruner.before_layer``: scoring, pruning, the pruned
    segments' masks) over the language model's forward (which includes it).
    """
    state = getattr(model, STATE_ATTR, None)
    if state is None or (state.pre is None and state.pruner is None):
        return None
    device = next(model.parameters()).device
    adapter = state.adapter
    work, extra, base = _Clock(device), _Clock(device), _Clock(device)
    if state.pre is not None:
        patches = [(state, "select", work)]
        for tower, module in _towers(adapter):
            patches += [(tower, "run", extra), (module, "forward", base)]
        of = "vision_tower"
    else:
        patches = [(state.pruner, "before_layer", work), (adapter.language_model(), "forward", base)]
        of = "llm"
    saved = [(obj, name, obj.__dict__.get(name, _ABSENT)) for obj, name, _ in patches]
    for obj, name, clock in patches:  # instance attributes shadowing the methods, restored below
        object.__setattr__(obj, name, clock.wrap(getattr(obj, name)))
    try:
        model(**inputs)
    finally:
        for obj, name, before in saved:
            if before is _ABSENT:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = before
    if base.seconds <= 0:
        return None
    capture = max(extra.seconds - base.seconds, 0.0) if of == "vision_tower" else 0.0
    return (work.seconds + capture) / base.seconds, of


def _towers(adapter: Any) -> list[tuple[Any, nn.Module]]:
    """(the adapter's tower wrapper, whose ``run`` captures the signals; the tower module) of every vision tower it
    runs: ``adapter.tower``, and a separate ``adapter.video_tower`` where the model encodes videos with its own
    (Video-LLaVA)."""
    pairs = [(adapter.tower, adapter.vision_module())]
    video = getattr(adapter, "video_tower", None)
    module = getattr(video, "tower", None)
    if video is not None and video is not adapter.tower and isinstance(module, nn.Module):
        pairs.append((video, module))
    return pairs


@dataclass
class BenchRow:
    """Medians for one (method, budget, batch size) against vanilla timed in the same rounds.

    Speedups are vanilla / method (> 1 is faster). ``ideal_speedup``: vanilla / method of the counted
    FLOPs of the TTFT call, ``generate(max_new_tokens=1)``: vision tower, projector, method, LLM prefill and
    the head on the last position (``bench_prefill`` always counts them; ``ideal_kind`` says which ideal).
    ``ideal_forward_speedup`` is the same for ``model(**inputs)``, whose head runs on every position (on a
    7B-shaped model that head is a sixth of the FLOPs and shrinks with the prompt, so that ideal is higher).
    """

    method: str
    tokens: int | None  # visual tokens per image (video) the LLM ends with (counted on the bench's input)
    batch_size: int
    forward_speedup: float  # model(...) (vision + compression + prefill)
    ttft_speedup: float  # generate(max_new_tokens=1)
    ideal_speedup: float
    ideal_speedup_llm: float  # LLM prefill MACs (per layer: in-LLM methods prune between layers)
    vanilla_forward_ms: float
    method_forward_ms: float
    vanilla_ttft_ms: float
    method_ttft_ms: float
    overhead_share: float | None  # compression time / time of the stage it shortens, median over the rounds
    decode_tokens_per_s: float  # batch_size * 32 new tokens / (generate(33 new) - TTFT), medians
    vanilla_decode_tokens_per_s: float
    kv_cache_bytes: int  # every layer's keys + values after prefill
    vanilla_kv_cache_bytes: int
    peak_memory_bytes: int | None  # one forward (see peak_memory)
    vanilla_peak_memory_bytes: int | None
    flops: int | None = None  # counted FLOPs of the TTFT call, generate(max_new_tokens=1) (see count_flops)
    vanilla_flops: int | None = None
    ideal_forward_speedup: float | None = None  # the same for model(**inputs) (its head runs on every position)
    forward_flops: int | None = None
    vanilla_forward_flops: int | None = None
    overhead_of: str | None = None  # that stage: "vision_tower" (pre-LLM methods) or "llm" (in-LLM methods)
    ideal_kind: str = "llm_macs"  # what ideal_speedup divides: "flops" (counted, end to end) or "llm_macs"
    compiled: bool = False  # timed with the language model compiled and a static KV cache (bench.compiled)
    peak_memory_kind: str = "process"  # "process": this process's peak; "child": a fresh process per config
    vanilla_tokens: int | None = None  # visual tokens per image (video) of the vanilla model (the bench's input)
    budget: str = ""  # the budget asked for: "tokens=N" or "ratio=r"


@torch.no_grad()
def bench_prefill(
    model: nn.Module,
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    runs: list[tuple[str, dict[str, Any]]],
    batch_sizes: list[int],
    repeats: int = 10,
    progress: Callable[[int], Any] | None = None,
    compile: bool | str = False,
    child: ChildSpec | None = None,
) -> list[BenchRow]:
    """Time every (method, knobs) at every batch size, each round interleaving vanilla and method.

    ``make_inputs(batch_size)`` returns processor outputs on the model's device. One warm-up round
    is discarded. Each round times, in order: forward, TTFT, generate with exactly 32 + 1 new tokens
    (decode = that minus TTFT), and on the method side the compression overhead.

    ``progress(n)`` is called after each round (``len(batch_sizes) * len(runs) * (repeats + 1)`` in all).
    ``compile`` (True or a torch.compile backend): time inside ``bench.compiled.compiled(model, backend)``
    (both sides; methods with an in-LLM stage run eager on both sides, ``row.compiled`` says which). FLOPs,
    KV bytes and peak memory are taken eager.
    ``child``: measure each configuration's peak memory in a fresh process (``bench.memory``) from this
    template (its batch size, method and knobs are filled in) instead of in this process.
    """
    rows = []
    for batch_size in batch_sizes:
        calls = _Calls(model, make_inputs(batch_size))
        reference = _static(calls, child, batch_size, None, {})
        for method, knobs in runs:
            use_compile = compile and compilable(model, method, **knobs)
            backend = compile if isinstance(compile, str) else "inductor"
            with compiled(model, backend) if use_compile else nullcontext():
                vanilla, squeezed = interleaved(calls.measures(), partial(compressed, model, method, **knobs), repeats,
                                                on_round=progress)
            with compressed(model, method, **knobs):
                measured = _static(calls, child, batch_size, method, knobs)
            rows.append(_row(calls, method, knobs, batch_size, vanilla, squeezed, reference, measured,
                             bool(use_compile), "process" if child is None else "child"))
    return rows


class _Calls:
    """The calls a bench times on one batch of inputs: forward, TTFT (one new token) and 32 + 1 new tokens."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        self.model, self.inputs = model, inputs
        self.device = next(model.parameters()).device

    def forward(self) -> Any:
        return self.model(**self.inputs)

    def ttft(self) -> Any:
        return self.model.generate(**self.inputs, max_new_tokens=1, do_sample=False)

    def decode(self) -> Any:
        n = DECODE_TOKENS + 1
        return self.model.generate(**self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def overhead(self) -> float:
        found = compression_overhead(self.model, self.inputs)
        return float("nan") if found is None else found[0]

    def measures(self) -> dict[str, Callable[[], float]]:
        """What each interleaved round measures, in order: seconds of forward, TTFT, decode; the overhead share."""
        return {"forward": partial(timed, self.forward, self.device), "ttft": partial(timed, self.ttft, self.device),
                "decode": partial(timed, self.decode, self.device), "overhead": self.overhead}


@dataclass
class _Static:
    """What one configuration measures once, eager: each decoder layer's length and the KV bytes after one
    prefill, peak memory, counted FLOPs of the TTFT call and of one forward, the overhead's stage."""

    lengths: list[int]
    kv_bytes: int
    peak: int | None
    flops: int
    forward_flops: int
    overhead_of: str | None


def _static(calls: _Calls, child: ChildSpec | None, batch_size: int, method: str | None,
            knobs: dict[str, Any]) -> _Static:
    """The once-measured numbers of the model as it is now (vanilla, or inside ``compressed``)."""
    cache = prefill_cache(calls.model, calls.inputs)
    lengths, kv = [int(layer.keys.shape[2]) for layer in cache.layers], kv_cache_bytes(cache)
    del cache
    peak = peak_memory(calls.model, calls.forward) if child is None else _child_peak(child, batch_size, method, knobs)
    found = compression_overhead(calls.model, calls.inputs) if method is not None else None
    return _Static(lengths, kv, peak, count_flops(calls.model, calls.ttft).total,
                   count_flops(calls.model, calls.forward).total, None if found is None else found[1])


def _row(calls: _Calls, method: str, knobs: dict[str, Any], batch_size: int, vanilla: dict[str, list[float]],
         squeezed: dict[str, list[float]], reference: _Static, measured: _Static, compiled_: bool,
         peak_kind: str) -> BenchRow:
    """One row: medians of the interleaved rounds, ratios to vanilla, and the once-measured numbers."""
    planned = plan(calls.model, method, **knobs)
    # visual tokens per image (or video) on the bench's input (every row holds it once): its placeholders, less the
    # tokens the method removed by the LLM's last layer whose cache holds the whole sequence (a sliding layer's may not)
    vanilla_tokens = int(torch.isin(calls.inputs["input_ids"][0].cpu(), torch.tensor(placeholder_ids(planned.adapter)))
                         .sum())
    last = max(i for i, n in enumerate(reference.lengths) if n == max(reference.lengths))
    final_tokens = vanilla_tokens - (reference.lengths[last] - measured.lengths[last])
    budget = f"tokens={knobs['tokens']}" if "tokens" in knobs else f"ratio={knobs['ratio']:.3g}" if "ratio" in knobs \
        else ""
    v = {name: statistics.median(seconds) for name, seconds in vanilla.items() if name != "overhead"}
    m = {name: statistics.median(seconds) for name, seconds in squeezed.items() if name != "overhead"}
    shares = [s for s in squeezed["overhead"] if not math.isnan(s)]
    text_cfg = planned.adapter.language_model().config
    new = batch_size * DECODE_TOKENS
    return BenchRow(
        method=method, tokens=final_tokens, batch_size=batch_size, vanilla_tokens=vanilla_tokens, budget=budget,
        forward_speedup=v["forward"] / m["forward"], ttft_speedup=v["ttft"] / m["ttft"],
        ideal_speedup=reference.flops / measured.flops,
        ideal_speedup_llm=llm_prefill_macs(reference.lengths, text_cfg) / llm_prefill_macs(measured.lengths, text_cfg),
        vanilla_forward_ms=1e3 * v["forward"], method_forward_ms=1e3 * m["forward"],
        vanilla_ttft_ms=1e3 * v["ttft"], method_ttft_ms=1e3 * m["ttft"],
        overhead_share=statistics.median(shares) if shares else None,
        decode_tokens_per_s=new / max(m["decode"] - m["ttft"], 1e-9),
        vanilla_decode_tokens_per_s=new / max(v["decode"] - v["ttft"], 1e-9),
        kv_cache_bytes=measured.kv_bytes, vanilla_kv_cache_bytes=reference.kv_bytes,
        peak_memory_bytes=measured.peak, vanilla_peak_memory_bytes=reference.peak,
        flops=measured.flops, vanilla_flops=reference.flops, ideal_kind="flops",
        ideal_forward_speedup=reference.forward_flops / measured.forward_flops, forward_flops=measured.forward_flops,
        vanilla_forward_flops=reference.forward_flops, overhead_of=measured.overhead_of, compiled=compiled_,
        peak_memory_kind=peak_kind,
    )


def placeholder_ids(adapter: Any) -> list[int]:
    """The placeholder tokens of a model's visual inputs: its image token, and its video token where it has one."""
    video = getattr(adapter.config, "video_token_id", None)
    return [adapter.image_token_id] + ([int(video)] if video is not None and adapter.takes_videos else [])


def _child_peak(child: ChildSpec, batch_size: int, method: str | None, knobs: dict[str, Any]) -> int | None:
    return child_peak_memory(replace(child, batch_size=batch_size, method=method, knobs=dict(knobs)))


def write_json(rows: list[BenchRow], path: str | Path, **meta: Any) -> None:
    """``{**meta, "rows": [each row's fields]}`` as JSON (meta: device, command, model, ...)."""
    data = {**meta, "rows": [asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


_STAGE = {"vision_tower": "tower", "llm": "LLM", None: "?"}


def format_rows(rows: list[BenchRow], vanilla_tokens: int | None, repeats: int, device: str) -> str:
    """A markdown table of the rows (ratios are vanilla / method: > 1 is faster)."""
    counted = any(r.ideal_kind == "flops" for r in rows)
    ideal_name = "ideal (FLOPs)" if counted else "ideal (LLM MACs)"
    lines = [
        f"Device: {device}; medians of {repeats} interleaved rounds; ratios = vanilla / method (> 1 is faster).",
        "forward: model(**inputs) = vision tower + compression + LLM prefill; TTFT: generate(max_new_tokens=1); "
        + ("ideal: counted FLOPs of the TTFT call vanilla / method (tower, method, LLM prefill, last-position "
           "head), TTFT / ideal the share of it achieved; LLM ideal: LLM prefill multiply-adds; "
           if counted else "ideal: LLM prefill multiply-adds vanilla / method; ")
        + "overhead: compression time / the vision tower's time (pre-LLM methods) or the LLM's (in-LLM methods); "
        "decode: tokens/s over 32 new tokens (whole batch); "
        "KV: cache MiB after prefill; peak: MiB over one forward; vanilla -> method.",
        "",
        f"| batch | method | visual tokens | forward speedup | TTFT speedup | {ideal_name} | TTFT / ideal "
        "| LLM ideal | vanilla forward ms | method forward ms | overhead | decode tok/s | KV MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = "n/a" if r.overhead_share is None else f"{100 * r.overhead_share:.1f}% of {_STAGE[r.overhead_of]}"
        lines.append(
            f"| {r.batch_size} | {r.method}{f' [{r.budget}]' if r.budget.startswith('ratio') else ''} | "
            f"{r.vanilla_tokens or vanilla_tokens or 'per image'} -> {r.tokens} | "
            f"{r.forward_speedup:.2f}x | {r.ttft_speedup:.2f}x | {r.ideal_speedup:.2f}x | "
            f"{r.ttft_speedup / r.ideal_speedup:.2f} | {r.ideal_speedup_llm:.2f}x | "
            f"{r.vanilla_forward_ms:.1f} | {r.method_forward_ms:.1f} | {overhead} | "
            f"{r.vanilla_decode_tokens_per_s:.0f} -> {r.decode_tokens_per_s:.0f} | "
            f"{_mb(r.vanilla_kv_cache_bytes)} -> {_mb(r.kv_cache_bytes)} | "
            f"{_mb(r.vanilla_peak_memory_bytes)} -> {_mb(r.peak_memory_bytes)} |"
        )
    return "\n".join(lines) + "\n"

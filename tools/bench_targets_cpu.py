"""The bench's CPU targets (time to first token vs its end-to-end ideal, compression overhead) on a
reduced-depth 7B architecture, measured with the functions `vlmzip bench` uses but fewer forwards (no decode /
forward timing; one interleaved TTFT round after a warm-up), for a machine too slow or too shared for the full
bench at this size. Prints one JSON line per measurement.

    OMP_NUM_THREADS=1 python tools/bench_targets_cpu.py --layers 1 --batch-size 1
    OMP_NUM_THREADS=2 python tools/bench_targets_cpu.py --model arch:video-llava-7b --layers 4 --frames 8 --tokens 136
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vlmzip
from vlmzip.bench import compare_ttft
from vlmzip.bench.memory import ChildSpec, child_peak_memory
from vlmzip.bench.prefill import compression_overhead, count_flops, kv_cache_bytes, prefill_cache
from vlmzip.bench.video import synthetic_clip, video_inputs
from vlmzip.io import batch_inputs, load_model
from vlmzip.knobs import parse_value
from vlmzip.lab import default_image

PROMPT = "What color is the small object?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="arch:llava-1.5-7b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--method", default="visionzip")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--knob", action="append", default=[], help="another knob of the method, key=value (repeatable)")
    ap.add_argument("--frames", type=int, default=None, help="time a synthetic clip of F frames instead of an image")
    ap.add_argument("--image-size", type=int, default=None, help="resize the image (each frame) to N x N pixels")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved TTFT rounds after the warm-up")
    args = ap.parse_args()
    start = time.time()

    def say(**fields: object) -> None:
        print(json.dumps({"t_s": round(time.time() - start), **fields}), flush=True)

    model, processor = load_model(args.model, dtype="float32", layers=args.layers)
    image = default_image()
    if args.image_size:
        image = image.resize((args.image_size, args.image_size))
    if args.frames:
        clips = [synthetic_clip(image, args.frames)] * args.batch_size
        inputs = video_inputs(processor, clips, [PROMPT] * args.batch_size, model)
    else:
        inputs = batch_inputs(processor, [image] * args.batch_size, [PROMPT] * args.batch_size, model)
    knobs = {"tokens": args.tokens, **{k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.knob)}}
    squeezed = vlmzip.compressed(model, args.method, **knobs)
    with torch.no_grad():
        cache = prefill_cache(model, inputs)
        v_kv, v_len = kv_cache_bytes(cache), [int(layer.keys.shape[2]) for layer in cache.layers]
        with vlmzip.compressed(model, args.method, **knobs):
            cache = prefill_cache(model, inputs)
            kv, lengths = kv_cache_bytes(cache), [int(layer.keys.shape[2]) for layer in cache.layers]
            overhead = compression_overhead(model, inputs)
        del cache
        say(vanilla_kv_bytes=v_kv, kv_bytes=kv, vanilla_lengths=v_len, lengths=lengths,
            kv_ratio=kv / v_kv, length_ratio=sum(lengths) / sum(v_len), overhead=overhead)
        ttft = compare_ttft(model, inputs, args.method, knobs, repeats=args.repeats)
        say(vanilla_ttft_s=ttft.vanilla_s, ttft_s=ttft.compressed_s, ttft_speedup=ttft.speedup)

        def first_token() -> object:
            return model.generate(**inputs, max_new_tokens=1, do_sample=False)

        vanilla_flops = count_flops(model, first_token).total
        with squeezed:
            flops = count_flops(model, first_token).total
        ideal = vanilla_flops / flops
        say(vanilla_flops=vanilla_flops, flops=flops, ideal=ideal, ttft_over_ideal=ttft.speedup / ideal)
    if args.no_memory:
        return
    spec = ChildSpec(args.model, "cpu", "float32", args.layers, args.image_size, PROMPT, args.batch_size,
                     frames=args.frames)
    vanilla_peak = child_peak_memory(spec)
    peak = child_peak_memory(ChildSpec(**{**spec.__dict__, "method": args.method, "knobs": knobs}))
    say(vanilla_peak_bytes=vanilla_peak, peak_bytes=peak)


if __name__ == "__main__":
    main()

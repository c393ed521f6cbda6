"""The shared interleaved timing loop (vlmzip.bench.interleaved) and the prefill benchmark built on it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
import torch
from conftest import random_image

import vlmzip
from vlmzip.bench import bench_prefill, compare_ttft, interleaved, llm_prefill_macs
from vlmzip.bench.memory import peak_memory
from vlmzip.bench.prefill import compression_overhead, count_flops, kv_cache_bytes, prefill_cache, prefill_lengths
from vlmzip.cli import main
from vlmzip.io import batch_inputs


def test_interleaved_alternates_sides_and_drops_the_warm_up_round() -> None:
    calls: list[str] = []
    state = {"side": "vanilla", "round": 0}

    @contextlib.contextmanager
    def compress() -> Iterator[None]:
        calls.append("enter")
        state["side"] = "compressed"
        yield
        state["side"] = "vanilla"
        state["round"] += 1

    def measure(name: str) -> float:
        calls.append(f"{state['side']}:{name}")
        return 10.0 * state["round"] + (1.0 if name == "b" else 0.0) + (0.5 if state["side"] == "compressed" else 0.0)

    vanilla, squeezed = interleaved({"a": lambda: measure("a"), "b": lambda: measure("b")}, compress, repeats=2)
    round_ = ["vanilla:a", "vanilla:b", "enter", "compressed:a", "compressed:b"]
    assert calls == round_ * 3  # the warm-up round, then 2 timed rounds; a fresh context each round
    assert vanilla == {"a": [10.0, 20.0], "b": [11.0, 21.0]}
    assert squeezed == {"a": [10.5, 20.5], "b": [11.5, 21.5]}
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved({"a": lambda: 0.0}, contextlib.nullcontext, repeats=0)


def test_bench_prefill_and_compare_ttft_time_both_sides(model, processor) -> None:
    image = random_image(3)

    def make_inputs(batch_size: int) -> dict:
        return batch_inputs(processor, [image] * batch_size, ["what color ?"] * batch_size, model)

    (row,) = bench_prefill(model, make_inputs, [("visionzip", {"tokens": 16})], [2], repeats=1)
    assert (row.method, row.tokens, row.batch_size) == ("visionzip", 16, 2)
    assert row.forward_speedup > 0 and row.ttft_speedup > 0 and row.ideal_speedup_llm > 1
    assert row.vanilla_forward_ms > 0 and row.method_forward_ms > 0
    timing = compare_ttft(model, make_inputs(1), "visionzip", {"tokens": 16}, repeats=2)
    assert len(timing.vanilla_s) == len(timing.compressed_s) == 2 and timing.speedup > 0
    assert not vlmzip.is_compressed(model)  # every round's context was left


def test_ideal_counts_each_layers_tokens_for_in_llm_methods(model, processor) -> None:
    image = random_image(4)

    def make_inputs(batch_size: int) -> dict:
        return batch_inputs(processor, [image] * batch_size, ["what color ?"] * batch_size, model)

    prompt = make_inputs(1)["input_ids"].shape[1]
    (row,) = bench_prefill(model, make_inputs, [("fastv", {"tokens": 16, "layer": 1})], [1], repeats=1)
    cfg = model.config.text_config
    assert prefill_lengths(model, make_inputs(1)) == [prompt, prompt]
    with vlmzip.compressed(model, "fastv", tokens=16, layer=1):
        assert prefill_lengths(model, make_inputs(1)) == [prompt, prompt - 48], "layer 1 holds 16 of 64"
    assert row.tokens == 16
    expected = llm_prefill_macs(prompt, cfg) / llm_prefill_macs([prompt, prompt - 48], cfg)
    assert row.ideal_speedup_llm == pytest.approx(expected)


def test_rows_carry_memory_kv_decode_and_overhead(model, processor) -> None:
    image = random_image(5)

    def make_inputs(batch_size: int) -> dict:
        return batch_inputs(processor, [image] * batch_size, ["what color ?"] * batch_size, model)

    inputs = make_inputs(1)
    prompt = inputs["input_ids"].shape[1]
    (vz, fv) = bench_prefill(model, make_inputs, [("visionzip", {"tokens": 16}), ("fastv", {"tokens": 16, "layer": 1})],
                             [1], repeats=1)
    cfg = model.config.text_config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # k + v, fp32
    assert vz.vanilla_kv_cache_bytes == fv.vanilla_kv_cache_bytes == 2 * prompt * per_token
    assert vz.kv_cache_bytes == 2 * (prompt - 48) * per_token, "every layer holds 16 of 64 visual tokens"
    assert fv.kv_cache_bytes == (prompt + prompt - 48) * per_token, "layer 0 keeps all, layer 1 holds 16"
    assert vz.decode_tokens_per_s > 0 and vz.vanilla_decode_tokens_per_s > 0
    assert vz.overhead_of == "vision_tower" and 0 < vz.overhead_share
    assert fv.overhead_of == "llm" and 0 < fv.overhead_share < 1, "the LLM's time includes the pruning"
    assert vz.ideal_speedup_llm > 1 and vz.ideal_speedup > 1
    assert vz.vanilla_peak_memory_bytes is None or vz.vanilla_peak_memory_bytes > 0
    with vlmzip.compressed(model, "visionzip", tokens=16):
        assert kv_cache_bytes(prefill_cache(model, inputs)) == vz.kv_cache_bytes
        share, of = compression_overhead(model, inputs)
        assert share > 0 and of == "vision_tower"
        assert type(model._vlmzip).select is not None and "select" not in vars(model._vlmzip), "timers removed"
    assert compression_overhead(model, inputs) is None  # vanilla: nothing to time
    peak = peak_memory(model, lambda: model(**inputs))
    assert peak is None or peak > sum(p.nbytes for p in model.parameters())


def test_bench_out_writes_json_rows(llava_dir, tmp_path, capsys) -> None:
    import json

    argv = ["bench", "--model", str(llava_dir), "--methods", "visionzip", "--tokens", "16", "--batch-sizes", "1",
            "--repeats", "1", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert "| decode tok/s |" in capsys.readouterr().out
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert data["command"].startswith("vlmzip bench --model") and data["device"].startswith("cpu")
    (row,) = data["rows"]
    for key in ("method", "tokens", "batch_size", "ttft_speedup", "forward_speedup", "ideal_speedup",
                "ideal_speedup_llm", "overhead_share", "peak_memory_bytes", "vanilla_peak_memory_bytes",
                "kv_cache_bytes", "vanilla_kv_cache_bytes", "decode_tokens_per_s", "vanilla_decode_tokens_per_s"):
        assert key in row, key
    assert (row["method"], row["tokens"], row["batch_size"]) == ("visionzip", 16, 1)


def test_arch_memory_check_refuses_with_a_depth_that_fits(monkeypatch) -> None:
    import vlmzip.builders.registry as registry
    import vlmzip.io as io

    monkeypatch.setattr(registry, "available_memory", lambda device: int(21.3e9))
    with pytest.raises(ValueError, match=r"arch:llava-1.5-7b in float32 needs ~3\d\.\d GB .* 21\.3 GB available on "
                                         r"cpu; --layers (\d+) fits") as err:
        io.load_model("arch:llava-1.5-7b", dtype="float32")
    fits = int(err.value.args[0].rsplit("--layers ", 1)[1].split()[0])
    arch = registry.get_arch("llava-1.5-7b")
    total, per_layer, depth = registry.weight_bytes(arch, arch.spec, torch.float32)
    assert depth == 32 and 6.5e9 < total / 4 < 7.5e9  # ~7B parameters in 4 bytes each
    with pytest.raises(ValueError, match=f"with {fits + 1} decoder layers"):
        io.load_model("arch:llava-1.5-7b", dtype="float32", layers=fits + 1)
    monkeypatch.setattr(registry, "available_memory", lambda device: int(1e9))
    with pytest.raises(ValueError, match="not even --layers 1 fits"):
        io.load_model("arch:llava-1.5-7b", dtype="bfloat16", layers=1)


def test_counted_flops_match_the_analytic_llm_and_give_the_end_to_end_ideal(model, processor) -> None:
    image = random_image(6)
    inputs = batch_inputs(processor, [image] * 2, ["what color ?", "how many shapes are there ?"], model)
    cfg = model.config.text_config
    for knobs in ({}, {"method": "visionzip", "tokens": 16}, {"method": "fastv", "tokens": 16, "layer": 1}):
        context = vlmzip.compressed(model, **knobs) if knobs else contextlib.nullcontext()
        with context:
            lengths = prefill_lengths(model, inputs)
            counted = count_flops(model, lambda: model(**inputs))
        analytic = 2 * 2 * llm_prefill_macs(lengths, cfg)  # 2 FLOPs per multiply-add, 2 sequences
        assert counted.llm_layers == pytest.approx(analytic, rel=0.03), knobs
        assert counted.total > counted.llm_layers  # + vision tower, projector, head
    (row,) = bench_prefill(model, lambda b: inputs, [("visionzip", {"tokens": 16})], [2], repeats=1)
    assert row.ideal_kind == "flops" and row.ideal_speedup == pytest.approx(row.vanilla_flops / row.flops)
    assert 1 < row.ideal_speedup < row.ideal_speedup_llm, "the vision tower's cost is the same on both sides"


def test_interleaved_reports_each_round_for_a_progress_bar() -> None:
    ticks: list[int] = []
    interleaved({"a": lambda: 1.0}, contextlib.nullcontext, repeats=3, on_round=ticks.append)
    assert ticks == [1, 1, 1, 1], "the warm-up round and 3 timed rounds"


def test_compiled_model_answers_like_the_eager_one_and_is_restored(model, processor) -> None:
    from vlmzip.adapters import adapter_for
    from vlmzip.bench.compiled import compilable, compiled

    inputs = batch_inputs(processor, [random_image(7), random_image(8)], ["what color ?", "how many shapes ?"], model)

    def answer() -> tuple:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    def method(name: str) -> contextlib.AbstractContextManager:
        return vlmzip.compressed(model, name, tokens=16) if name != "vanilla" else contextlib.nullcontext()

    eager = {}
    for name in ("vanilla", "visionzip"):
        with method(name):
            eager[name] = answer(), model(**inputs).logits
    lm = adapter_for(model).language_model()
    # inductor (generated C++ kernels) on VisionZip's generate; vanilla and the forward through aot_eager
    # (the same graphs, eager kernels), which keeps this test to two inductor compilations on a CPU
    for name, backend in (("visionzip", "inductor"), ("vanilla", "aot_eager")):
        with compiled(model, backend):
            assert lm._compiled_call_impl is not None and model.generation_config.cache_implementation == "static"
            with method(name):
                sequences, scores = answer()
                logits = model(**inputs).logits if backend == "aot_eager" else None
        assert torch.equal(sequences, eager[name][0][0]), name
        torch.testing.assert_close(scores, eager[name][0][1], rtol=1e-4, atol=1e-4)
        if logits is not None:
            torch.testing.assert_close(logits, eager[name][1], rtol=1e-4, atol=1e-4)
    assert "_compiled_call_impl" not in vars(lm) and model.generation_config.cache_implementation is None
    assert compilable(model, "visionzip", tokens=16) and compilable(model, None)
    assert not compilable(model, "fastv", tokens=16, layer=1), "in-LLM pruning runs eager"
    with method("visionzip"), pytest.raises(ValueError, match="compile the vanilla"):
        with compiled(model):
            pass


def test_bench_compile_times_both_sides_compiled(llava_dir, tmp_path, capsys) -> None:
    """Through the CLI with the quick aot_eager backend (inductor's outputs are checked above; in-LLM
    methods' rows run eager: ``compilable`` above)."""
    import json

    out = tmp_path / "b"
    argv = ["bench", "--model", str(llava_dir), "--methods", "visionzip", "--tokens", "16", "--batch-sizes", "1",
            "--repeats", "1", "--compile", "aot_eager", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert "--compile: language model torch.compile'd (aot_eager)" in capsys.readouterr().out
    (row,) = json.loads((out / "bench.json").read_text())["rows"]
    assert row["compiled"] is True
    assert (out / "speedup.png").read_bytes().startswith(b"\x89PNG")


def test_child_peak_memory_measures_each_configuration_in_a_fresh_process(llava_dir, model, processor) -> None:
    from vlmzip.bench.memory import ChildSpec, child_peak_memory

    spec = ChildSpec(str(llava_dir), "cpu", "float32", None, None, "what color ?", 1)
    image = random_image(9)

    def make_inputs(batch_size: int) -> dict:
        return batch_inputs(processor, [image] * batch_size, ["what color ?"] * batch_size, model)

    (row,) = bench_prefill(model, make_inputs, [("visionzip", {"tokens": 16})], [1], repeats=1, child=spec)
    assert row.peak_memory_kind == "child"
    weights = sum(p.nbytes for p in model.parameters())
    if row.peak_memory_bytes is not None:  # None only where Linux refuses the reset
        assert row.peak_memory_bytes > weights and row.vanilla_peak_memory_bytes > weights
    with pytest.raises(RuntimeError, match="peak-memory child for visionzip failed"):  # fails in the child
        child_peak_memory(ChildSpec(str(llava_dir / "absent"), "cpu", "float32", None, None, "q", 1, "visionzip"))


def _row(method: str, tokens: int, ttft_ms: float, vanilla_ms: float = 100.0):
    from vlmzip.bench.prefill import BenchRow

    return BenchRow(method=method, tokens=tokens, batch_size=1, forward_speedup=1.0, ttft_speedup=vanilla_ms / ttft_ms,
                    ideal_speedup=2.0, ideal_speedup_llm=3.0, vanilla_forward_ms=vanilla_ms, method_forward_ms=ttft_ms,
                    vanilla_ttft_ms=vanilla_ms, method_ttft_ms=ttft_ms, overhead_share=0.01, decode_tokens_per_s=1.0,
                    vanilla_decode_tokens_per_s=1.0, kv_cache_bytes=1, vanilla_kv_cache_bytes=2,
                    peak_memory_bytes=1, vanilla_peak_memory_bytes=2)


def _results(runs: list[tuple[str, int, float]]) -> dict:
    return {"config": {"data": "lab-test"}, "n_questions": 10,
            "runs": [{"method": m, "tokens": t, "scores": {"macro_accuracy": a}} for m, t, a in runs]}


def test_pareto_matches_eval_runs_to_timed_rows_and_keeps_the_undominated(tmp_path) -> None:
    from vlmzip.bench.plots import frontier, pareto_points, plot_pareto, plot_speedups

    rows = [_row("visionzip", 16, 50.0), _row("visionzip", 8, 40.0), _row("fastv", 16, 70.0)]
    results = _results([("vanilla", 64, 0.8), ("visionzip", 16, 0.7), ("visionzip", 8, 0.5), ("fastv", 16, 0.6),
                        ("random", 16, 0.1)])
    points = pareto_points(rows, results, batch_size=1)
    assert points == {"visionzip": [(50.0, 0.7, 16), (40.0, 0.5, 8)], "fastv": [(70.0, 0.6, 16)],
                      "vanilla": [(100.0, 0.8, 64)]}, "random was not timed: left out"
    everything = [p for series in points.values() for p in series]
    assert frontier(everything) == [(40.0, 0.5, 8), (50.0, 0.7, 16), (100.0, 0.8, 64)], "fastv is dominated"
    assert plot_pareto(rows, results, tmp_path / "p.png") == 3
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    plot_speedups(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="none of the eval's runs"):
        plot_pareto(rows, _results([("vanilla", 64, 0.8), ("tome", 16, 0.7)]), tmp_path / "q.png")


def test_bench_eval_refuses_other_weights_and_missing_out(llava_dir, tmp_path) -> None:
    import json

    run = tmp_path / "ev"
    run.mkdir()
    results = {**_results([("vanilla", 64, 0.8), ("visionzip", 16, 0.7)]), "identity": {"weights_sha256": "0" * 64}}
    (run / "results.json").write_text(json.dumps(results))
    base = ["bench", "--model", str(llava_dir), "--tokens", "16", "--batch-sizes", "1", "--repeats", "1", "--quiet"]
    assert main([*base, "--eval", str(run)]) == 2  # no --out: nowhere to write the plot
    assert main([*base, "--eval", str(run), "--out", str(tmp_path / "b")]) == 2  # other weights
    assert main([*base, "--eval", str(tmp_path), "--out", str(tmp_path / "b")]) == 2  # no results.json there


def test_bench_eval_writes_the_pareto_plot_from_a_real_eval_run(llava_dir, tmp_path, capsys) -> None:
    from vlmzip.lab.scenes import write_split

    write_split("val", tmp_path / "data", n_images=2)
    run = tmp_path / "ev"
    assert main(["eval", "--model", str(llava_dir), "--data", str(tmp_path / "data"), "--out", str(run),
                 "--methods", "vanilla,visionzip", "--tokens", "16", "--limit", "2", "--max-new-tokens", "2"]) == 0
    out = tmp_path / "b"
    assert main(["bench", "--model", str(llava_dir), "--tokens", "16", "--batch-sizes", "1", "--repeats", "1",
                 "--quiet", "--eval", str(run), "--out", str(out)]) == 0
    assert f"wrote {out / 'pareto.png'}" in capsys.readouterr().out
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")


def test_bench_takes_knobs_in_brackets(llava_dir, tmp_path) -> None:
    out = tmp_path / "b"
    assert main(["bench", "--model", str(llava_dir), "--methods", "fastv[layer=1],visionzip", "--tokens", "16",
                 "--batch-sizes", "1", "--repeats", "1", "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["method"], r["tokens"]) for r in rows] == [("fastv", 16), ("visionzip", 16)]
    assert rows[0]["kv_cache_bytes"] > rows[1]["kv_cache_bytes"], "fastv at layer 1 keeps layer 0 in full"


def test_bench_on_images_with_their_own_counts_takes_ratios_and_counts_the_tokens(tmp_path, capsys) -> None:
    """A model whose images have their own counts (Qwen2-VL) is timed at shares of the image's count (the papers'
    budgets as shares by default); each row says the bench image's vanilla count and what the LLM ends with."""
    from vlmzip.builders.qwen_vl import QwenVLSpec, build_qwen_vl

    build_qwen_vl(tmp_path / "qwen", QwenVLSpec(text_layers=3))
    out = tmp_path / "b"
    assert main(["bench", "--model", str(tmp_path / "qwen"), "--methods", "visionzip,fastv[layer=1]",
                 "--ratios", "0.5,0.25", "--batch-sizes", "1", "--repeats", "1", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "bench.json").read_text())["rows"]
    vanilla = rows[0]["vanilla_tokens"]
    assert vanilla > 8 and all(r["vanilla_tokens"] == vanilla for r in rows)
    assert [(r["method"], r["budget"], r["tokens"]) for r in rows] == [
        ("visionzip", "ratio=0.5", round(vanilla * 0.5)), ("visionzip", "ratio=0.25", round(vanilla * 0.25)),
        ("fastv", "ratio=0.5", round(vanilla * 0.5)), ("fastv", "ratio=0.25", round(vanilla * 0.25))]
    assert f"| visionzip [ratio=0.25] | {vanilla} -> {round(vanilla * 0.25)} |" in printed
    assert main(["bench", "--model", str(tmp_path / "qwen"), "--batch-sizes", "1", "--repeats", "1", "--quiet",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["budget"] for r in rows] == ["ratio=0.333", "ratio=0.222", "ratio=0.111"]
    assert main(["bench", "--model", str(tmp_path / "qwen"), "--tokens", "8", "--ratios", "0.5"]) == 2
    assert "give --tokens or --ratios, not both" in capsys.readouterr().err

"""The bench's figures: speedup vs the ideal per method / budget / batch size (``speedup.png`` next to
bench.json), and accuracy vs time to first token per method from an eval run of the same model
(``pareto.png``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .prefill import BenchRow


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budget_axis(ax: Any, budgets: list[int]) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(budgets) == 1:
        ax.set_xlim(budgets[0] / 2, budgets[0] * 2)


def plot_speedups(rows: list[BenchRow], path: str | Path, title: str = "") -> None:
    """PNG: one panel per batch size; per method, TTFT speedup (solid) and the end-to-end ideal from
    counted FLOPs (dashed, same colour) against the visual tokens kept per image."""
    plt = _pyplot()
    batches = sorted({r.batch_size for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), dpi=120, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r.method for r in rows))
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, method in enumerate(methods):
            mine = sorted((r for r in rows if r.batch_size == batch and r.method == method and r.tokens is not None),
                          key=lambda r: r.tokens)
            if not mine:
                continue
            x = [r.tokens for r in mine]
            colour = colours[i % len(colours)]
            suffix = "" if all(r.compiled for r in mine) or not any(r.compiled for r in mine) else " (mixed)"
            ax.plot(x, [r.ttft_speedup for r in mine], marker="o", color=colour, label=f"{method} TTFT{suffix}")
            ax.plot(x, [r.ideal_speedup for r in mine], linestyle="--", marker="x", color=colour,
                    label=f"{method} ideal (FLOPs)")
        budgets = sorted({r.tokens for r in rows if r.tokens is not None})
        if budgets:
            _budget_axis(ax, budgets)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel("visual tokens per image")
        ax.set_ylabel("speedup over vanilla (x)")
        ax.set_title(f"batch {batch}" + (f" - {title}" if title else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    """The results.json of a ``vlmzip eval --out RUN_DIR`` folder, with a clear error when it is not one."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ValueError(f"--eval {run_dir}: no results.json there; pass the --out folder of a finished vlmzip eval")
    try:
        results = json.loads(path.read_text())
        results["runs"][0]["scores"]["macro_accuracy"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"--eval {run_dir}: {path} is not a vlmzip eval results.json ({err!r})") from None
    return results


def pareto_points(rows: list[BenchRow], results: dict[str, Any], batch_size: int) -> dict[str, list[tuple]]:
    """Per method, ``(TTFT ms, accuracy, tokens)`` for every eval run the bench also timed at ``batch_size``
    (matched on method and visual tokens per image); ``"vanilla"``: the median vanilla TTFT of those rows.
    Accuracy: the eval's mean over question types."""
    timed = {(r.method, r.tokens): r for r in rows if r.batch_size == batch_size}
    points: dict[str, list[tuple]] = {}
    for run in results["runs"][1:]:
        if run["tokens"] is None:  # each image its own count: no one bench row to match
            continue
        row = timed.get((run["method"], int(run["tokens"])))
        if row is not None:
            points.setdefault(run["method"], []).append(
                (row.method_ttft_ms, run["scores"]["macro_accuracy"], int(run["tokens"])))
    mine = [r for r in rows if r.batch_size == batch_size]
    if mine:
        vanilla = results["runs"][0]
        points["vanilla"] = [(statistics.median(r.vanilla_ttft_ms for r in mine),
                              vanilla["scores"]["macro_accuracy"], vanilla["tokens"])]
    return points


def frontier(points: list[tuple]) -> list[tuple]:
    """The points no other point beats on both time (lower) and accuracy (higher), by time."""
    best: list[tuple] = []
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or p[1] > best[-1][1]:
            best.append(p)
    return best


def plot_pareto(rows: list[BenchRow], results: dict[str, Any], path: str | Path) -> int:
    """PNG: accuracy vs time to first token, one panel per batch size, one series per method, the Pareto
    frontier over all of them drawn as a step line. Returns how many (method, budget) pairs matched;
    raises ValueError when none did (the eval ran other methods or budgets)."""
    plt = _pyplot()
    batches = sorted({r.batch_size for r in rows})
    per_batch = {b: pareto_points(rows, results, b) for b in batches}
    matched = max(sum(len(v) for k, v in pts.items() if k != "vanilla") for pts in per_batch.values())
    if not matched:
        ran = sorted({(r["method"], r["tokens"]) for r in results["runs"][1:]})
        raise ValueError(f"--eval: none of the eval's runs {ran} was benchmarked here; bench the same methods "
                         "and --tokens the eval ran")
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), dpi=120, squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        pts = per_batch[batch]
        for method, series in pts.items():
            series.sort()
            marker = "*" if method == "vanilla" else "o"
            ax.plot([p[0] for p in series], [100 * p[1] for p in series], marker=marker, linestyle="none",
                    markersize=10 if method == "vanilla" else 6, label=method)
            for t, acc, tokens in series:
                ax.annotate(str(tokens), (t, 100 * acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
        edge = frontier([p for series in pts.values() for p in series])
        ax.step([p[0] for p in edge], [100 * p[1] for p in edge], where="post", color="black", linewidth=0.8,
                alpha=0.6, label="Pareto frontier")
        ax.set_xlabel(f"time to first token, batch {batch} (ms)")
        ax.set_ylabel("accuracy, mean over question types (%)")
        ax.set_title(f"{results['config']['data']} ({results['n_questions']} q); labels: visual tokens", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return matched

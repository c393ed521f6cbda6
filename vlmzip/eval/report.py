"""Turning results into the papers' kind of table (raw score and % of vanilla per column, average
last) and an accuracy-vs-tokens plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TYPE_ORDER = ("presence", "count", "color", "shape", "spatial", "text", "detail")


def run_label(run: dict[str, Any]) -> str:
    """A run's method as ``--methods`` spelled it (bracketed knobs, composition stages), without the
    swept budget: ``"cluster_saliency[variant=2]@28"`` -> ``"cluster_saliency[variant=2]"``."""
    key = str(run.get("key", run["method"]))
    budget = run.get("knobs", {}).get("tokens")
    return key[: -len(f"@{budget}")] if budget is not None and key.endswith(f"@{budget}") else key


def columns(vanilla_scores: dict[str, Any]) -> list[str]:
    """Question-type columns in the benchmark's order (unknown types after, sorted)."""
    types = list(vanilla_scores["per_type"])
    return [t for t in TYPE_ORDER if t in types] + sorted(t for t in types if t not in TYPE_ORDER)


def _cell(value: float, reference: float) -> str:
    pct = f"{100 * value / reference:.1f}%" if reference > 0 else "n/a"
    return f"{100 * value:.1f} ({pct})"


def column_values(scores: dict[str, Any], cols: list[str]) -> list[float]:
    """Accuracy per column, then POPE F1 when present."""
    values = [scores["per_type"].get(c, {}).get("accuracy", 0.0) for c in cols]
    if "pope" in scores:
        values.append(scores["pope"]["all"]["f1"])
    return values


def retention_table(results: dict[str, Any]) -> str:
    """Markdown: one row per run, grouped by budget; each cell 'raw (% of vanilla)'; Avg last.

    Avg is the mean over question types of accuracy, and the mean of the per-type retentions.
    """
    runs = results["runs"]
    vanilla = runs[0]
    cols = columns(vanilla["scores"])
    has_pope = "pope" in vanilla["scores"]
    ref = column_values(vanilla["scores"], cols)
    header = ["Method", "Tokens", *cols, *(["POPE F1"] if has_pope else []), "Avg", "Off-vocab"]
    lines = [
        f"Data: {results['config']['data']} ({results['n_questions']} questions); "
        f"model: {results['identity']['model']}; scorer: {results['config']['match']} match.",
        "Cells: accuracy (% of vanilla). Avg: mean over question types. Off-vocab: % of answers that are no "
        "valid answer of their type (out of format, not just wrong; valid: for a lab split every answer the "
        "benchmark has for the type, for a dataset folder every gold answer of the type in it).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def row(run: dict[str, Any]) -> str:
        values = column_values(run["scores"], cols)
        per_type = values[: len(cols)]
        avg = sum(per_type) / len(per_type) if per_type else 0.0
        retained = [v / r for v, r in zip(per_type, ref[: len(cols)], strict=True) if r > 0]
        avg_pct = f"{100 * sum(retained) / len(retained):.1f}%" if retained else "n/a"
        cells = [_cell(v, r) for v, r in zip(values, ref, strict=True)]
        name = run_label(run)
        off = f"{100 * run['scores'].get('off_vocabulary', 0.0):.1f}"
        tokens = token_cell(run)
        return "| " + " | ".join([name, tokens, *cells, f"{100 * avg:.1f} ({avg_pct})", off]) + " |"

    total = vanilla["tokens"]
    lines.append(row(vanilla))
    for budget in [*sorted({nominal(r) for r in runs[1:]} - {None}, reverse=True), None]:
        members = [r for r in runs[1:] if nominal(r) == budget]
        if not members:
            continue
        if budget is None:  # a budget of the method's own knobs, or a ratio: each image its own count
            title = "**Other budgets**"
        else:
            kept = "" if total is None else f" ({100 * budget / total:.1f}%)"
            title = f"**Retain {budget} tokens{kept}**"
        lines.append(f"| {title} |" + " |" * (len(header) - 1))
        lines.extend(row(r) for r in members)
    return "\n".join(lines + notes_lines(runs)) + "\n"


def notes_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The table's closing notes: what ``vlmzip.plan`` said about the methods on this model, once each."""
    notes = dict.fromkeys(note for run in runs for note in run.get("notes", []))
    return ["", *(f"Note: {note}." for note in notes)] if notes else []


def nominal(run: dict[str, Any]) -> int | None:
    """The run's nominal budget (the tokens it was given), else the visual tokens it ends with; None when
    neither is one number (a ratio, or a model whose images each have their own count)."""
    value = run["tokens"] if run.get("budget") is None else run["budget"]
    return None if value is None else int(value)


def token_cell(run: dict[str, Any]) -> str:
    """The nominal budget; for in-LLM methods and compositions also the visual tokens the LLM receives
    (sent), ends with (final) and averages over its decoder layers (from ``vlmzip.plan``)."""
    budget = nominal(run)
    if budget is None:
        given = {k: v for k, v in run.get("knobs", {}).items() if k in ("ratio", "dominant", "contextual")}
        return ", ".join(f"{k} {v}" for k, v in given.items()) or "per image"
    cell = str(budget)
    if run.get("layer_avg_tokens") is not None:
        sent = "" if run.get("sent_tokens") is None else f"sent {run['sent_tokens']}, "
        cell += f" ({sent}final {run['tokens']}, layer avg {run['layer_avg_tokens']:.1f})"
    return cell


def budgets_run(results: dict[str, Any]) -> list[int]:
    """The nominal budgets of the compressed runs, ascending (the plot's x ticks)."""
    return sorted({nominal(run) for run in results["runs"][1:]} - {None})


def accuracy_figure(results: dict[str, Any]) -> Any:
    """The matplotlib figure of ``plot_accuracy``: mean accuracy over question types vs visual tokens per
    image, one line per method, the x axis ticked at the budgets actually run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator

    runs = results["runs"]
    vanilla = runs[0]
    by_method: dict[str, list[tuple[int, float]]] = {}
    for run in runs[1:]:
        if nominal(run) is not None:  # a ratio or per-image count has no place on the tokens axis
            by_method.setdefault(run_label(run), []).append((nominal(run), run["scores"]["macro_accuracy"]))
    # Every line its own (colour, marker): the default 10-colour cycle repeats colours from the 11th method
    # on (a full lab sweep draws 12 methods), and a legend beside the axes hides no line.
    colours = plt.get_cmap("tab10" if len(by_method) <= 10 else "tab20").colors
    markers = "osD^vP*Xh<>p"
    fig, ax = plt.subplots(figsize=(6 + 2.5 * (len(by_method) > 4), 4), dpi=120)
    for i, (method, points) in enumerate(sorted(by_method.items())):
        points.sort()
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=markers[i % len(markers)],
                color=colours[i % len(colours)], label=method)
    of = "each image's own" if vanilla["tokens"] is None else str(vanilla["tokens"])
    ax.axhline(100 * vanilla["scores"]["macro_accuracy"], color="gray", linestyle="--",
               label=f"vanilla ({of} tokens)")
    ax.set_xscale("log", base=2)
    budgets = budgets_run(results)
    if budgets:  # ticks at the budgets run, written as plain numbers (not powers of 2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(budgets) == 1:
            ax.set_xlim(budgets[0] / 2, budgets[0] * 2)
    ax.set_xlabel(f"visual tokens per image (of {of})")
    ax.set_ylabel("accuracy, mean over question types (%)")
    ax.set_title(f"{results['config']['data']} ({results['n_questions']} questions)")
    ax.grid(alpha=0.3)
    if len(by_method) > 4:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    else:
        ax.legend()
    fig.tight_layout()
    return fig


def plot_accuracy(results: dict[str, Any], path: str | Path) -> None:
    """PNG: mean accuracy over question types vs visual tokens per image, one line per method."""
    fig = accuracy_figure(results)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)

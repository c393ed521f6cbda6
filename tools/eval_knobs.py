"""Evaluate one method with extra knob settings (``vlmzip eval --methods`` takes names only) next to a
finished ``vlmzip eval`` folder, with that folder's data, limit, budgets and batch size; resumable.

    python tools/eval_knobs.py --base runs/sal --method cluster_saliency_llm --knob variant=2 --knob variant=3 \
        --out runs/sal-variants

Writes ``--out``/predictions/*.jsonl, results.json and table.md: the base folder's runs followed by the new
ones (keys ``method[knob=value]@tokens``), in the base's retention table format.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from vlmzip.api import plan
from vlmzip.cli import _parse_value
from vlmzip.eval.data import load_folder
from vlmzip.eval.distributed import Processes
from vlmzip.eval.report import retention_table
from vlmzip.eval.runner import EvalConfig, Run, data_folder, merge_predictions, read_run, run_predictions
from vlmzip.eval.scorers import answer_vocabulary, score_records
from vlmzip.io import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a finished `vlmzip eval` folder (its results.json)")
    parser.add_argument("--method", required=True)
    parser.add_argument("--knob", action="append", required=True, metavar="KEY=VALUE", help="one run per knob setting")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    base = json.loads((Path(args.base) / "results.json").read_text())
    cfg = EvalConfig(**{k: v for k, v in base["config"].items() if k in EvalConfig.__dataclass_fields__})
    cfg.out = args.out
    out = Path(args.out) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_folder(data_folder(cfg.data))
    records = dataset[: cfg.limit]
    model, processor = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    runs = []
    for setting in args.knob:
        key, value = setting.split("=", 1)
        for tokens in cfg.tokens:
            knobs = {key: _parse_value(value), "tokens": tokens}
            planned = plan(model, args.method, **knobs)
            runs.append(Run(f"{args.method}[{setting}]@{tokens}", args.method, knobs, planned.final_tokens,
                            planned.layer_avg_tokens, tokens, planned.tokens))
    with tqdm(total=len(runs) * len(records), unit="q") as bar:
        for run in runs:
            run_predictions(model, processor, run, records, out, cfg, bar, Processes())
    vocabulary = answer_vocabulary(dataset)
    rows = []
    for run in runs:
        merge_predictions(out, run.key, records)
        predictions = read_run(out, run.key)
        scores = score_records([predictions[r.id] for r in records], match=cfg.match, vocabulary=vocabulary)
        rows.append({**asdict(run), "method": run.key.rsplit("@", 1)[0], "scores": scores})
    results = {**base, "runs": base["runs"] + rows}
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    table = retention_table(results)
    (Path(args.out) / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

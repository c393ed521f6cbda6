"""Speed measurements. Every number is a ratio to vanilla measured in the same run (median of repeats)."""

from .prefill import BenchRow, bench_prefill, format_rows, llm_prefill_macs
from .timing import TTFTComparison, compare_ttft, interleaved, time_to_first_token

__all__ = [
    "BenchRow", "TTFTComparison", "bench_prefill", "compare_ttft", "format_rows", "interleaved",
    "llm_prefill_macs", "time_to_first_token",
]  # fmt: skip

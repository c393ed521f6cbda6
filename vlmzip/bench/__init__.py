"""Speed measurements. Every number is a ratio to vanilla measured in the same run (median of repeats)."""

from .prefill import BenchRow, bench_prefill, count_flops, format_rows, kv_cache_bytes, llm_prefill_macs, write_json
from .timing import TTFTComparison, compare_ttft, interleaved, time_to_first_token

__all__ = [
    "BenchRow", "TTFTComparison", "bench_prefill", "compare_ttft", "format_rows", "interleaved",
    "count_flops", "kv_cache_bytes", "llm_prefill_macs", "time_to_first_token", "write_json",
]  # fmt: skip

"""Speed measurements. Every number is a ratio to vanilla measured in the same run (median of repeats)."""

from .timing import TTFTComparison, compare_ttft, time_to_first_token

__all__ = ["TTFTComparison", "compare_ttft", "time_to_first_token"]

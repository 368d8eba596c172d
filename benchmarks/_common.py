"""The old name of the benchmarks' helpers, kept for ``examples/demo.py``: see ``harness.py``."""

from harness import Timing, machine_info, set_threads, time_rows, write_results

__all__ = ["Timing", "machine_info", "set_threads", "time_rows", "write_results"]

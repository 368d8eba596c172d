"""The CUDA runtime: pieces captured as ``torch.cuda.CUDAGraph``.

* One memory pool for the process: every piece and every bucket captures into the same
  ``graph_pool_handle()``. Sharing is safe here because a piece's static outputs are consumed
  (copied into the next piece's static inputs, or cloned when they escape) before any other
  graph replays, and what escapes uncloned (``clone_outputs=False``) is documented to be
  overwritten by later calls.
* Warm-up runs on a side stream before capture, so lazy initialisation (cuBLAS handles,
  autotuning, allocator growth) happens outside the graph.
* Capture does not run the work: the first call replays, like every later one.
* Random ops draw from the default CUDA generator, which torch registers with each graph, so
  every replay gets fresh random numbers (graph-safe Philox offsets).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hpuopt.errors import CaptureError
from hpuopt.runtime.base import (
    CapturedGraph,
    SharedRuntime,
    find_output_aliases,
    tensor_nbytes,
)

log = logging.getLogger(__name__)


class CudaRuntime(SharedRuntime):
    name = "cuda"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise CaptureError("the CUDA runtime needs a CUDA device")
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self._held = 0

    def capture(
        self,
        fn: Callable[..., Sequence[Any]],
        static_inputs: list[Any],
        warmup_runs: int = 1,
        warmup_inputs: list[Any] | None = None,
    ) -> CapturedGraph:
        warm = static_inputs if warmup_inputs is None else warmup_inputs
        side = self.stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                fn(*warm)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                outputs = list(fn(*static_inputs))
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # an op that cannot be captured: report it as such
            torch.cuda.synchronize()
            raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
        nbytes = max(torch.cuda.memory_allocated() - before, tensor_nbytes(outputs))
        self._held += nbytes
        return CapturedGraph(
            static_inputs=static_inputs,
            static_outputs=outputs,
            replay=graph.replay,
            nbytes=nbytes,
            aliases=find_output_aliases(outputs, static_inputs),
        )

    def release(self, graph: CapturedGraph) -> None:
        self._held -= graph.nbytes
        graph.static_outputs.clear()

    def mark_step(self) -> None:
        return None

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def memory_report(self) -> dict[str, int]:
        return {
            "graph_bytes": self._held,
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
        }

"""The CUDA runtime: pieces captured as ``torch.cuda.CUDAGraph``.

What a CUDA graph bakes in, and the rules that follow
------------------------------------------------------
A captured graph replays recorded kernel launches: the addresses they read and write, the
launch parameters, and every host value a kernel took by value (a CPU scalar operand is read at
launch, so inside a graph it is frozen). The split keeps host work out of captured pieces and the
runner copies CPU tensor inputs into device buffers; this module owns the device side:

* **Right device.** A graph is captured on the device of its inputs, with a side stream and a
  memory pool of that device, never whatever device happens to be current: a model on ``cuda:1``
  captured while device 0 is current would record nothing on device 1. Replay switches to the
  graph's device when another one is current.
* **One capture at a time, thread-local error mode.** A process-wide lock serialises warm-up and
  capture, and ``capture_error_mode="thread_local"`` lets other threads (a pinned-memory loader)
  keep calling CUDA APIs that are illegal during a *global* capture.
* **A failed capture leaves the process healthy.** The capture is driven with ``capture_begin``
  and ``capture_end`` directly rather than ``torch.cuda.graph``, whose ``__exit__`` skips
  restoring the current stream when ``capture_end`` raises. On failure the stream is restored,
  the capture is ended, and the pool it used is abandoned: a failed ``capture_end`` can leave a
  private pool in capture mode, so later captures start a fresh pool. A failed ``capture_end``
  also skips the generator's capture epilogue, which leaves the device's default CUDA generator
  marked as capturing: every later random op outside a capture then raises ("Offset increment
  outside graph capture"), and so does every replay of a graph that draws random numbers. An
  empty capture on the same device runs the prologue and epilogue once more and clears the mark,
  keeping the generator's state object that earlier graphs registered with.
* **Pools by rule.** Graphs that share a pool must not have live outputs in memory another graph
  of the pool uses as scratch while that other graph replays. Each caller names its pool
  (``pool``): the runner of a piece uses one pool for all of its buckets, and at most one of
  a piece's graphs replays per call, so a piece's outputs consumed later in the call (by a
  non-adjacent piece) cannot be overwritten by another graph's replay. Outputs lent to the user
  (``clone_outputs=False``) are marked stale when any graph of their pool replays.
* **Honest memory.** A graph's bytes are the growth of its device's reserved memory during the
  capture (its private pool) or its live allocations, whichever is larger. Releasing the last
  graph of a pool drops the pool and returns the cached segments to the device.
* Warm-up runs on the side stream before capture, so lazy initialisation (cuBLAS handles,
  autotuning, allocator growth) happens outside the graph. Capture does not run the work: the
  first call replays, like every later one. Random ops draw from the default CUDA generator,
  which torch registers with each graph, so every replay gets fresh random numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from hpuopt.errors import CaptureError
from hpuopt.runtime.base import (
    CapturedGraph,
    SharedRuntime,
    find_output_aliases,
    restore_mutated,
    tensor_nbytes,
)

log = logging.getLogger(__name__)

CAPTURE_LOCK = threading.RLock()
"""One warm-up and capture at a time in this process, across all compiled models."""


def capture_device(values: Sequence[Any]) -> torch.device:
    """The CUDA device a piece with these inputs runs on: that of its CUDA tensor inputs
    (with an explicit index), else the current device. Inputs on two CUDA devices are refused."""
    devices = {v.device for v in values if isinstance(v, torch.Tensor) and v.device.type == "cuda"}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise CaptureError(f"inputs live on several CUDA devices ({names})")
    device = devices.pop() if devices else torch.device("cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclasses.dataclass
class _Pool:
    handle: Any
    graphs: int = 0


class CudaRuntime(SharedRuntime):
    name = "cuda"
    default_piece_compiler = "eager"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise CaptureError("the CUDA runtime needs a CUDA device")
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._pools: dict[tuple[int, Hashable], _Pool] = {}
        self._held = 0

    def capture(
        self,
        fn: Callable[..., Sequence[Any]],
        static_inputs: list[Any],
        warmup_runs: int = 1,
        warmup_inputs: list[Any] | None = None,
        pool: Hashable = None,
    ) -> CapturedGraph:
        device = capture_device(static_inputs)
        key = (device.index, pool)
        with CAPTURE_LOCK, torch.cuda.device(device):
            stream = self._stream(device)
            _warm_up(fn, static_inputs if warmup_inputs is None else warmup_inputs,
                     warmup_runs, stream, static_inputs)
            pool = self._pools.setdefault(key, _Pool(torch.cuda.graph_pool_handle()))
            before = _memory(device)
            graph = torch.cuda.CUDAGraph()
            try:
                outputs = _record(graph, fn, static_inputs, pool.handle, stream)
            except BaseException as exc:
                self._abandon(key, pool)
                _end_generator_capture(stream)
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                if isinstance(exc, Exception):
                    raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
                raise
            after = _memory(device)
        pool.graphs += 1
        grown = max(after[0] - before[0], after[1] - before[1])
        nbytes = max(grown, tensor_nbytes(outputs))
        self._held += nbytes
        return CapturedGraph(
            static_inputs=static_inputs,
            static_outputs=outputs,
            replay=_replayer(graph, device),
            nbytes=nbytes,
            aliases=find_output_aliases(outputs, static_inputs),
            handle=(graph, key),
        )

    def release(self, graph: CapturedGraph) -> None:
        self._held -= graph.nbytes
        graph.static_outputs.clear()
        cuda_graph, key = graph.handle
        cuda_graph.reset()
        pool = self._pools.get(key)
        if pool is None:  # an abandoned pool's graphs: nothing else refers to it
            return
        pool.graphs -= 1
        if pool.graphs <= 0:
            del self._pools[key]
            with torch.cuda.device(key[0]):
                torch.cuda.empty_cache()  # the pool's segments go back to the device

    def mark_step(self) -> None:
        return None

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def memory_report(self) -> dict[str, int]:
        return {
            "graph_bytes": self._held,
            "pools": len(self._pools),
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
        }

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device=device)
        return stream

    def _abandon(self, key: tuple[int, Hashable], pool: _Pool) -> None:
        """A capture into ``pool`` failed: later captures under ``key`` get a fresh pool."""
        log.info("capture failed on cuda:%s; starting a fresh memory pool", key[0])
        if self._pools.get(key) is pool:
            del self._pools[key]


def _warm_up(fn: Callable[..., Any], inputs: Sequence[Any], runs: int,
             stream: torch.cuda.Stream, static: Sequence[Any]) -> None:
    if runs <= 0:
        return
    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        for _ in range(runs):
            fn(*inputs)
            restore_mutated(inputs, static)
    current.wait_stream(stream)


def _record(graph: torch.cuda.CUDAGraph, fn: Callable[..., Sequence[Any]], inputs: Sequence[Any],
            pool: Any, stream: torch.cuda.Stream) -> list[Any]:
    """Captures ``fn(*inputs)`` into ``graph`` on ``stream``; the current stream is restored and
    the capture ended whatever happens (see the module docstring)."""
    torch.cuda.synchronize()
    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    torch.cuda.set_stream(stream)
    try:
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            outputs = list(fn(*inputs))
        except BaseException:
            try:
                graph.capture_end()
            except Exception:  # noqa: BLE001 - the capture is already invalid; the first error wins
                log.debug("capture_end after a failed capture raised", exc_info=True)
            raise
        graph.capture_end()
    finally:
        torch.cuda.set_stream(current)
    current.wait_stream(stream)
    return outputs


def _end_generator_capture(stream: torch.cuda.Stream) -> None:
    """Runs an empty capture on the current device so that the default generator's capture
    epilogue runs after a failed ``capture_end`` skipped it (see the module docstring)."""
    empty = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the graph is empty: it is meant to be
            empty.capture_begin(capture_error_mode="thread_local")
            empty.capture_end()
    except Exception:  # noqa: BLE001 - the original capture error is the one to report
        log.warning("could not reset the CUDA generator after a failed capture", exc_info=True)
    finally:
        empty.reset()


def _memory(device: torch.device) -> tuple[int, int]:
    return torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)


def _replayer(graph: torch.cuda.CUDAGraph, device: torch.device) -> Callable[[], None]:
    """``graph.replay`` itself on a one-GPU machine; elsewhere it switches to the graph's device
    when another one is current."""
    if torch.cuda.device_count() == 1:
        return graph.replay
    index = device.index

    def replay() -> None:
        if torch.cuda.current_device() == index:
            graph.replay()
        else:
            with torch.cuda.device(index):
                graph.replay()

    return replay

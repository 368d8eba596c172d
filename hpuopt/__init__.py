"""hpuopt: a torch.compile backend that replays device graphs for host-bound models.

``torch.compile(model, backend="hpugraph")`` works without importing this package (the backend
is registered through the ``torch_dynamo_backends`` entry point).
"""

from hpuopt.api import CompiledModel, compile, explain, reset, warmup
from hpuopt.backend import hpugraph_backend
from hpuopt.config import Config
from hpuopt.diagnostics.counters import Counters, counters
from hpuopt.diagnostics.explain import ExplainReport
from hpuopt import optim
from hpuopt.wrap import (
    GraphedForward,
    ModuleCacher,
    is_wrapped,
    unwrap,
    wrap_in_hpu_graph,
    wrap_submodules,
)
from hpuopt.errors import (
    CaptureError,
    ConfigError,
    FallbackError,
    HpuoptError,
    InputError,
    PassError,
)

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "CompiledModel",
    "Config",
    "ConfigError",
    "Counters",
    "ExplainReport",
    "FallbackError",
    "GraphedForward",
    "HpuoptError",
    "InputError",
    "ModuleCacher",
    "PassError",
    "compile",
    "counters",
    "explain",
    "hpugraph_backend",
    "is_wrapped",
    "optim",
    "reset",
    "unwrap",
    "wrap_in_hpu_graph",
    "warmup",
    "wrap_submodules",
]

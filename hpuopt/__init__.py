"""hpuopt: a torch.compile backend that replays device graphs for host-bound models.

``torch.compile(model, backend="hpugraph")`` works without importing this package when it is
installed (the ``torch_dynamo_backends`` entry point registers the backend); from a plain
checkout on ``PYTHONPATH``, importing ``hpuopt`` registers it.
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


def _register_backend() -> None:
    """Registers ``"hpugraph"`` with Dynamo when no installed entry point will (a plain
    checkout on ``PYTHONPATH``). With the package installed, the entry point registers it on
    first use, and registering here too would make that a duplicate."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "hpugraph" in _COMPILER_FNS:
        return
    if "hpugraph" in entry_points(group="torch_dynamo_backends").names:
        return
    register_backend(hpugraph_backend, name="hpugraph")


_register_backend()

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

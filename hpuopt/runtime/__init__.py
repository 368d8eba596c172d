"""Runtimes: each platform's capture/replay primitives behind one protocol."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from hpuopt.config import Config
from hpuopt.errors import ConfigError
from hpuopt.runtime.base import CapturedGraph, Runtime
from hpuopt.runtime.cpu import CpuRuntime

log = logging.getLogger(__name__)

__all__ = ["CapturedGraph", "CpuRuntime", "Runtime", "device_of", "select_runtime"]


def device_of(inputs: Sequence[Any]) -> str:
    """The device type a graph runs on: the first non-CPU tensor's, else ``"cpu"``."""
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
            return t.device.type
    return "cpu"


def select_runtime(config: Config, inputs: Sequence[Any]) -> Runtime:
    """The runtime named by the config, or the one matching the inputs' device."""
    name = config.runtime if config.runtime != "auto" else device_of(inputs)
    if name == "cpu":
        return CpuRuntime(check_capture=config.check_capture)
    if name == "cuda":
        from hpuopt.runtime.cuda import CudaRuntime

        return CudaRuntime.shared()
    if name == "direct":
        from hpuopt.runtime.direct import DirectRuntime

        return DirectRuntime()
    if name == "hpu":
        from hpuopt.runtime.hpu import HpuRuntime

        return HpuRuntime.for_config(config)
    raise ConfigError(f"no runtime for device type {name!r}; use runtime='cpu' to emulate")

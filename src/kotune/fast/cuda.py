"""Whether the GPU kernels' own packages can run here: a CUDA device, and the modules that hold them."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def cuda_with(*modules: str) -> bool:
    """True when a CUDA device is there and every one of ``modules`` imports (checked once per set)."""
    if not torch.cuda.is_available():
        return False
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True

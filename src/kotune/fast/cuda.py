"""Whether this process can run a fast kernel: a CUDA device, and the libraries the kernel imports.

Its own module (not the package's ``__init__``), so the kernel modules that ask need not import the package that
imports them.
"""

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

"""GPU memory figures for the progress bar and metrics.jsonl (nothing off the GPU). Reading them waits for
nothing on the device."""

from __future__ import annotations

import os

import torch

GIB = 2**30


def growable_segments() -> None:
    """Have PyTorch's CUDA allocator grow its segments in place (``expandable_segments``) unless the user set
    ``PYTORCH_CUDA_ALLOC_CONF``. With fixed-size segments, a long pass's tensors of many sizes leave cached
    blocks that fit no later request, and reserved memory outgrows allocated memory (measured in
    ``bench/RESULTS.md``). Read once, at the first CUDA allocation: call it before any."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def peak() -> dict[str, float]:
    """Peak allocated and reserved GiB since the last call (``metrics.jsonl``'s ``peak_allocated_gib`` /
    ``peak_reserved_gib``); the counters restart, so each logged step reports its own window."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    figures = {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
    }
    torch.cuda.reset_peak_memory_stats()
    return figures


def now() -> dict[str, str]:
    """``{"mem": "allocated/reserved GiB"}`` for the progress bar, or nothing off the GPU."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"mem": f"{torch.cuda.memory_allocated() / GIB:.1f}/{torch.cuda.memory_reserved() / GIB:.1f}G"}

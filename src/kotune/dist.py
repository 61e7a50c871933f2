"""Several processes through torchrun or ``accelerate launch``: both set RANK / WORLD_SIZE / LOCAL_RANK.

One process per GPU, each holding the whole 4-bit model; DDP averages LoRA gradients. With one process
every function here is a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as torch_dist


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return rank_and_world()[1] > 1


def init() -> None:
    """Join the process group when launched with several processes."""
    if is_distributed() and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch_dist.init_process_group(backend)


def wrap(model):
    """DDP over the trainable (LoRA) parameters when distributed; the model itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def no_sync(model, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if is_distributed() and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()

"""Several processes through torchrun or ``accelerate launch``: both set RANK / WORLD_SIZE / LOCAL_RANK.

One process per GPU. With DDP each holds the whole 4-bit model on its own device and PyTorch's DDP all-reduces
the LoRA gradients and nothing else; with FSDP (``kotune.training.fsdp``) each holds a shard of the base and the
LoRA gradients are averaged the same way (``ReplicatedTrainables``). With one process every function here is a
no-op, so the training loop reads the same either way.
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


def is_main() -> bool:
    return rank_and_world()[0] == 0


def init() -> None:
    """Join the process group when launched with several processes."""
    if is_distributed() and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch_dist.init_process_group(backend)


@contextlib.contextmanager
def main_first():
    """The first process runs the block before the others do (they then read what it cached)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def wrap(model):
    """DDP over the trainable (LoRA) parameters only, when distributed; the model itself otherwise.

    Frozen weights (4-bit, or the fast path's embedding table kept in host memory) and buffers are loaded the
    same on every process, so DDP is told to ignore them: never checked, broadcast or all-reduced. That also
    lets a module whose frozen parameters live on two device types (CPU embedding, GPU layers) be wrapped.
    """
    if not is_distributed():
        return model
    if is_sharded(model):
        return ReplicatedTrainables(model)
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, p in model.named_parameters() if not p.requires_grad]
    ignored += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any part of ``module`` is sharded with FSDP2 (``kotune.training.fsdp``)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


class ReplicatedTrainables(torch.nn.Module):
    """Under FSDP (``kotune.training.fsdp``): the trainable weights are whole on every process, and their
    gradients are averaged across the processes at the end of each backward outside ``no_sync``, as DDP does
    (DDP itself cannot wrap a module whose frozen weights are FSDP-sharded)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.sync = True

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        # the summed loss, or (log-probs, token counts) per sequence for a preference objective
        head = out[0] if isinstance(out, tuple) else out
        if self.sync and torch.is_grad_enabled() and head.requires_grad:
            head.register_hook(self._average_after_backward)
        return out

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _average_after_backward(self, grad):
        torch.autograd.Variable._execution_engine.queue_callback(self._average)
        return grad

    def _average(self) -> None:
        """One all-reduce of every gradient, flattened (a process with no gradient for a weight adds zeros)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = _flatten_dense_tensors(grads)
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        flat /= rank_and_world()[1]
        for p, g in zip(self.trainable, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g


def no_sync(model, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if is_distributed() and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> None:
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> None:
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)


def all_gather_objects(value) -> list:
    """Every process's ``value`` (picklable, on the host), in rank order; ``[value]`` with one process."""
    if not is_distributed():
        return [value]
    out = [None] * rank_and_world()[1]
    torch_dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()

"""FSDP2 for bases larger than one GPU: each decoder layer's frozen weights sharded across the processes.

``train.distributed: fsdp`` (or ``auto`` when the base does not fit one GPU). Each decoder layer is one
``fully_shard`` unit over its frozen weights: the 4-bit ones as :class:`~kotune.fast.nf4_tensor.NF4Tensor`, so
they are sharded and all-gathered in 4 bits with their quantization state, and the norms. kotune's own forward
(:mod:`kotune.fast.decoder`) gathers a layer's weights right before computing it and frees them right after, in
the forward and again around the backward's recomputation (``DecoderLayer.gathered``): a process holds its
shard of the base plus one layer at a time.

The LoRA weights stay whole on every process (``ignored_params``; r16 on q,k,v,o is 0.1% of a 70B base): the
optimizer, its 8-bit state, the checkpoints and the saved adapter are exactly a DDP run's, so a run moves
between 1 GPU, DDP and FSDP on resume. Their gradients are averaged across the processes once per step, as DDP
does (``kotune.training.dist.ReplicatedTrainables``).
"""

from __future__ import annotations

import torch

from kotune.errors import KotuneError
from kotune.fast.nf4_tensor import NF4Tensor
from kotune.training import dist


class CannotShard(KotuneError):
    """The model cannot be trained with ``train.distributed: fsdp`` (the message says why and what to do)."""

    refusal = True


def refuse_unshardable(layer: torch.nn.Module, where: str, world: int) -> None:
    """Every frozen weight of the decoder ``layer`` must be 4-bit (others would be all-gathered in 16 bits, and
    the base would not be the 4-bit model the run planned for) and split into ``world`` shards of whole rows and
    whole quantization groups (FSDP2 all-gathers equal shards)."""
    for name, param in layer.named_parameters():
        if param.requires_grad or param.ndim < 2:
            continue
        name = f"{where}.{name}"
        if not isinstance(param, NF4Tensor):
            raise CannotShard(f"{name} is not a 4-bit weight: train.distributed fsdp needs model.quantization: 4bit")
        rows = param.shape[0]
        try:
            if rows % world:
                raise ValueError(f"{rows} rows do not split into {world} equal shards")
            param.rows(0, rows // world)
        except ValueError as e:
            raise CannotShard(
                f"{name} {tuple(param.shape)} cannot be sharded across {world} processes ({e}); "
                "use train.distributed: ddp, or another number of processes"
            ) from None


class LayerSharding:
    """``fully_shard`` for one decoder layer at a time over this run's processes, LoRA weights left whole."""

    def __init__(self):
        from torch.distributed.device_mesh import init_device_mesh

        self.world = dist.rank_and_world()[1]
        self.mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (self.world,))
        self.count = 0

    def __call__(self, layer: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        refuse_unshardable(layer, f"model.layers.{self.count}", self.world)
        trainable = {p for p in layer.parameters() if p.requires_grad}
        fully_shard(layer, mesh=self.mesh, reshard_after_forward=True, ignored_params=trainable)
        self.count += 1


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the sharded weights this process holds (its shards' packed values, codes and scales)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else None
        if isinstance(local, NF4Tensor):
            total += sum(t.numel() * t.element_size() for t in local._sharded_parts().values())
        elif local is not None:
            total += local.numel() * local.element_size()
    return total

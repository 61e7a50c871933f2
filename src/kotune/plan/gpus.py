"""GPUs ``kotune plan --gpu`` knows: usable memory and dense bf16 tensor throughput (fp32 accumulation).

Throughput figures are the vendors' data-sheet peaks (dense, no sparsity); time on a GPU other than the one the
coefficients were measured on (``estimate.MEASURED_ON``) is scaled by the ratio of these peaks, an extrapolation.
"""

from __future__ import annotations

from dataclasses import dataclass

from kotune.errors import KotuneError

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    """What ``torch.cuda.mem_get_info`` reports as total on the card (the part the CUDA context leaves aside
    counts against the margin)."""
    bf16_tflops: float


GPUS = {
    g.name.lower(): g
    for g in (
        Gpu("H200", int(140.4 * GiB), 989.0),
        Gpu("H100-80GB", int(79.1 * GiB), 989.0),
        Gpu("H100-PCIe", int(79.1 * GiB), 756.0),
        Gpu("A100-80GB", int(79.1 * GiB), 312.0),
        Gpu("A100-40GB", int(39.4 * GiB), 312.0),
        Gpu("L40S", int(44.4 * GiB), 362.0),
        Gpu("A10G", int(22.0 * GiB), 70.0),
        Gpu("L4", int(22.0 * GiB), 121.0),
        Gpu("RTX4090", int(23.6 * GiB), 165.2),
        Gpu("RTX3090", int(23.6 * GiB), 71.0),
    )
}


class UnknownGpu(KotuneError, ValueError):
    """``--gpu`` names a card the table lacks; the message lists the ones it has."""


def gpu_named(name: str) -> Gpu:
    try:
        return GPUS[name.lower()]
    except KeyError:
        known = ", ".join(g.name for g in GPUS.values())
        raise UnknownGpu(f"unknown GPU {name!r}; kotune plan knows: {known}") from None


def present_gpu() -> Gpu | None:
    """This machine's first CUDA GPU (its real memory; throughput from the table when its name is known)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    return Gpu(name, total, _tflops_of(name, total))


def _tflops_of(name: str, total: int) -> float:
    """The table's throughput for a CUDA device name: same chip (``H100``, ``RTX4090``), nearest memory size;
    unknown chips get the H200's figure (the time estimate then says nothing about that card)."""
    flat = name.lower().replace(" ", "").replace("-", "")
    same_chip = [g for g in GPUS.values() if g.name.lower().split("-")[0] in flat]
    if not same_chip:
        return GPUS["h200"].bf16_tflops
    return min(same_chip, key=lambda g: abs(g.memory_bytes - total)).bf16_tflops

"""NF4 dequantization in one Triton kernel, for bitsandbytes' 4-bit weights on CUDA.

bitsandbytes dequantizes a double-quantized weight in three launches from Python (the 8-bit block scales,
an added offset, then the 4-bit values), each through its op dispatch and ctypes; a training step of an
8B model does that ~700 times per micro-batch. This kernel reads the same packed bytes and statistics and
writes the same values in one launch: ``out[2i], out[2i+1] = NF4[byte_i >> 4], NF4[byte_i & 15]`` times the
block scale, the scale itself ``code2[absmax_q[b]] * absmax2[b // 256] + offset`` when double-quantized.
``tests/test_fast_nf4.py`` checks it against ``bitsandbytes.functional.dequantize_4bit`` on the GPU.
"""

from __future__ import annotations

import functools

import torch

from kotune.fast.cuda import cuda_with


def available() -> bool:
    """Triton and CUDA are both there."""
    return cuda_with("triton")


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_nf4(packed, absmax, code2, absmax2, offset, table, out, n_bytes,
                    BLOCK: tl.constexpr, QBLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr):  # fmt: skip
        byte = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = byte < n_bytes
        q = tl.load(packed + byte, mask=keep, other=0).to(tl.int32)
        block = (byte * 2) // QBLOCK
        if NESTED:
            code = tl.load(absmax + block, mask=keep, other=0).to(tl.int32)
            group = tl.load(absmax2 + block // BLOCK2, mask=keep, other=0.0)
            scale = tl.load(code2 + code, mask=keep, other=0.0) * group + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=keep, other=0.0)
        high = tl.load(table + (q >> 4), mask=keep, other=0.0) * scale
        low = tl.load(table + (q & 15), mask=keep, other=0.0) * scale
        pair = tl.interleave(high, low).to(out.dtype.element_ty)
        element = tl.program_id(0) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out + element, pair, mask=element < 2 * n_bytes)

    return dequant_nf4


BYTES_PER_PROGRAM = 1024


class NF4Weight:
    """The kernel's arguments for one NF4 weight, gathered once (its quantization never changes)."""

    def __init__(self, packed, shape, table, blocksize, absmax, nested=None):
        """``packed``: the 4-bit bytes; ``absmax``: one scale per block, or with ``nested`` = (``code2``,
        ``absmax2``, ``offset``, ``blocksize2``) the 8-bit codes of double quantization."""
        self.packed = packed.view(torch.uint8).reshape(-1)
        self.shape, self.numel = tuple(shape), self.packed.numel() * 2
        device = self.packed.device
        self.table = table.to(device, torch.float32)
        self.blocksize, self.nested = blocksize, nested is not None
        if self.nested:
            code2, self.absmax2, offset, self.blocksize2 = nested
            self.absmax, self.code2 = absmax, code2.to(device)
            self.offset = torch.as_tensor(offset, dtype=torch.float32, device=device).reshape(1)
        else:
            self.absmax = absmax.float()
            self.code2 = self.absmax2 = self.offset = self.absmax
            self.blocksize2 = 1
        self.n_bytes = self.numel // 2
        self.grid = (-(-self.n_bytes // BYTES_PER_PROGRAM),)

    @classmethod
    def of(cls, weight) -> NF4Weight:
        """For a bitsandbytes ``Params4bit``."""
        qs = weight.quant_state
        if qs.quant_type != "nf4" or qs.shape.numel() % 2:
            raise ValueError("NF4Weight needs an nf4 weight with an even number of elements")
        nested = (qs.state2.code, qs.state2.absmax, qs.offset, qs.state2.blocksize) if qs.nested else None
        return cls(weight.data, qs.shape, qs.code, qs.blocksize, qs.absmax, nested)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as ``dtype`` ``[out, in]``, as bitsandbytes computes it (into ``out`` when given)."""
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
        _kernel()[self.grid](
            self.packed, self.absmax, self.code2, self.absmax2, self.offset, self.table, out, self.n_bytes,
            BLOCK=BYTES_PER_PROGRAM, QBLOCK=self.blocksize, BLOCK2=self.blocksize2, NESTED=self.nested,
            enable_fp_fusion=False,  # multiply, then add, rounded apart as bitsandbytes does
        )  # fmt: skip
        return out

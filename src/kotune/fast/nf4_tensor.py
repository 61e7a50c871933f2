"""A frozen NF4 weight as one tensor that FSDP2 can shard and all-gather in 4 bits.

bitsandbytes keeps an NF4 weight as packed bytes in a ``Params4bit`` and its quantization statistics in a
separate ``quant_state``; FSDP2 shards only the bytes, so the statistics are lost and training runs on
garbage (loss 0, gradient norm nan: accelerate #3983, bitsandbytes #1945). :class:`NF4Tensor` carries all of
it as inner tensors of one ``[out, in]`` tensor:

- ``packed``: two 4-bit codes a byte, row-major (``in / 2`` bytes a row);
- ``absmax``: one 8-bit code per block of ``blocksize`` values (double quantization), or the float32 scale;
- ``absmax2``: with double quantization, one float32 scale per group of ``blocksize2`` blocks;
- ``code2``, ``table``, ``offset``: the lookup tables and the mean, the same for every shard.

Sharding is by whole rows (FSDP2's dim 0), each shard on whole groups of blocks, so every shard is itself an
NF4 tensor. Through ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` the shards' packed bytes, codes and
group scales are what cross the wire, and the gathered tensor is rebuilt from them without a copy: nothing is
ever cast or dequantized by FSDP. ``dequantize`` computes what ``bitsandbytes.functional.dequantize_4bit``
computes (``tests/test_fsdp.py`` checks every element).
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map_only

from kotune.fast import nf4

aten = torch.ops.aten
SHARDED = ("packed", "absmax", "absmax2")
"""The inner tensors split by rows; the tables and the offset are whole in every shard."""


class NF4Tensor(torch.Tensor):
    """An ``[out, in]`` NF4 weight (frozen; see the module's docstring)."""

    @staticmethod
    def __new__(cls, shape, dtype, packed, absmax, absmax2, code2, table, offset, blocksize, blocksize2, row_len):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device)

    def __init__(self, shape, dtype, packed, absmax, absmax2, code2, table, offset, blocksize, blocksize2, row_len):
        """``row_len``: values a row (``in``); kept apart from the shape, which FSDP may view as 1-D."""
        self.packed, self.absmax, self.absmax2 = packed, absmax, absmax2
        self.code2, self.table, self.offset = code2, table, offset
        self.blocksize, self.blocksize2, self.row_len = blocksize, blocksize2, row_len
        self._kernel_args: nf4.NF4Weight | None = None

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, qs) -> NF4Tensor:
        """The NF4 weight of bitsandbytes' packed bytes and ``QuantState``, sharing their memory."""
        dtype = qs.dtype
        if qs.quant_type != "nf4":
            raise ValueError(f"NF4Tensor needs an nf4 weight, not {qs.quant_type}")
        packed = packed.view(torch.uint8).reshape(-1)
        rows, row_len = qs.shape
        if qs.nested:
            s2 = qs.state2
            offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device).reshape(1)
            return cls((rows, row_len), dtype, packed, qs.absmax, s2.absmax, s2.code, qs.code, offset,
                       qs.blocksize, s2.blocksize, row_len)  # fmt: skip
        return cls(
            (rows, row_len), dtype, packed, qs.absmax.float(), None, None, qs.code, None, qs.blocksize, 1, row_len
        )

    def _with(self, shape, **inner) -> NF4Tensor:
        """This weight's metadata with other inner tensors (by name) and shape."""
        parts = {name: getattr(self, name) for name in ("packed", "absmax", "absmax2", "code2", "table", "offset")}
        parts.update(inner)
        return NF4Tensor(shape, self.dtype, parts["packed"], parts["absmax"], parts["absmax2"], parts["code2"],
                         parts["table"], parts["offset"], self.blocksize, self.blocksize2, self.row_len)  # fmt: skip

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def _sharded_parts(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in SHARDED if getattr(self, name) is not None}

    def _units(self) -> dict[str, int]:
        """Values covered by one element of each sharded inner tensor."""
        units = {"packed": 2, "absmax": self.blocksize}
        if self.nested:
            units["absmax2"] = self.blocksize * self.blocksize2
        return units

    def rows(self, start: int, end: int) -> NF4Tensor:
        """Rows ``[start, end)`` as an NF4 tensor sharing this one's memory; raises ValueError unless both ends fall
        on whole quantization groups."""
        first, last = start * self.row_len, end * self.row_len
        parts = {}
        for name, unit in self._units().items():
            if first % unit or (last % unit and last != self.shape[0] * self.row_len):
                raise ValueError(
                    f"rows {start}:{end} of a {tuple(self.shape)} NF4 weight do not start and end on whole "
                    f"quantization groups of {unit} values"
                )
            parts[name] = getattr(self, name)[first // unit : -(-last // unit)]
        return self._with((end - start, self.row_len), **parts)

    # -- computing -----------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype``: the Triton kernel on CUDA, :meth:`dequantize_reference` else.
        Values are this tensor's dtype (bitsandbytes' ``quant_state.dtype``) first, then cast, as bitsandbytes
        computes them."""
        if self.packed.is_cuda and nf4.available():
            if self._kernel_args is None:
                nested = (self.code2, self.absmax2, self.offset, self.blocksize2) if self.nested else None
                self._kernel_args = nf4.NF4Weight(
                    self.packed, self.shape, self.table, self.blocksize, self.absmax, nested
                )
            return self._kernel_args.dequantize(self.dtype).to(dtype)
        return self.dequantize_reference(dtype)

    def dequantize_reference(self, dtype: torch.dtype) -> torch.Tensor:
        """bitsandbytes' arithmetic in torch ops: the block scale ``code2[code] * absmax2[group] + offset`` (or
        the stored scale), times ``table[nibble]``, high nibble first, in float32, then cast to this tensor's
        dtype and on to ``dtype``."""
        if self.nested:
            group = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.blocksize2
            scale = self.code2[self.absmax.long()] * self.absmax2[group] + self.offset
        else:
            scale = self.absmax
        nibbles = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).reshape(-1).long()
        values = self.table[nibbles].view(-1, self.blocksize) * scale[:, None]
        return values.view(self.shape[0], self.row_len).to(self.dtype).to(dtype)

    # -- FSDP2's all-gather extension ----------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """What crosses the wire: this shard's packed bytes, codes and group scales (never cast)."""
        parts = self._sharded_parts()
        return tuple(parts.values()), tuple(parts)

    def fsdp_post_all_gather(self, outputs, names, param_dtype, *, out=None):
        """The whole weight over the gathered buffers themselves (FSDP frees and refills them in place, so an
        earlier gathered tensor passed as ``out`` already points at the new values)."""
        if out is not None:
            return None
        gathered = dict(zip(names, outputs, strict=True))
        rows = gathered["packed"].numel() * 2 // self.row_len
        return self._with((rows, self.row_len), **gathered), tuple(outputs)

    # -- the tensor operations FSDP2 applies to a parameter -------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _OPS.get(func._overloadpacket)
        if op is None:
            raise NotImplementedError(f"NF4Tensor does not support {func}: it is a frozen 4-bit weight")
        return op(func, *args, **kwargs)

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def _whole(self: NF4Tensor, func, *args, **kwargs) -> NF4Tensor:
    """``func`` applied to every inner tensor (detach, a device move, pinning)."""
    parts = {name: getattr(self, name) for name in ("packed", "absmax", "absmax2", "code2", "table", "offset")}
    moved = tree_map_only(torch.Tensor, lambda t: func(t, *args, **kwargs), parts)
    return self._with(tuple(self.shape), **moved)


def _split(func, self, size, dim=0):
    if dim != 0:
        raise NotImplementedError("NF4Tensor splits by rows only")
    return [self.rows(start, min(start + size, self.shape[0])) for start in range(0, self.shape[0], size)]


def _slice(func, self, dim=0, start=None, end=None, step=1):
    if dim != 0 or step != 1:
        raise NotImplementedError("NF4Tensor slices whole rows only")
    rows = self.shape[0]
    return self.rows(max(0, start or 0), min(rows, rows if end is None else end))


def _new_zeros(func, self, size, **kwargs):
    values = math.prod(size)
    parts = {name: t.new_zeros(-(-values // self._units()[name])) for name, t in self._sharded_parts().items()}
    return self._with(tuple(size), **parts)


def _copy(func, self, source, non_blocking=False):
    if not isinstance(source, NF4Tensor) or tuple(source.shape) != tuple(self.shape):
        raise NotImplementedError("an NF4Tensor copies only from an NF4Tensor of its shape")
    for name, t in self._sharded_parts().items():
        t.copy_(getattr(source, name), non_blocking=non_blocking)
    self.code2, self.table, self.offset = source.code2, source.table, source.offset
    return self


def _view(func, self, size):
    if math.prod(size) != self.numel() and list(size) != [-1]:
        raise NotImplementedError(f"NF4Tensor cannot be viewed as {size}")
    shape = (self.numel(),) if list(size) == [-1] else tuple(size)
    return self._with(shape)


def _as_strided(func, self, size, stride, storage_offset=0):
    if tuple(size) != tuple(self.shape) or storage_offset:
        raise NotImplementedError("NF4Tensor: as_strided only to its own contiguous shape")
    return self._with(tuple(size))


def _is_pinned(func, self, device=None):
    return all(t.is_pinned() for t in self._sharded_parts().values())


_OPS = {
    aten.detach: lambda func, self: _whole(self, func),
    aten.alias: lambda func, self: _whole(self, func),
    aten._to_copy: lambda func, self, **kw: _whole(self, func, **{k: v for k, v in kw.items() if k != "dtype"}),
    aten._pin_memory: lambda func, self, device=None: _whole(self, func),
    aten.empty_like: lambda func, self, **kw: _whole(self, func, **{k: v for k, v in kw.items() if k != "dtype"}),
    aten.is_pinned: _is_pinned,
    aten.split: _split,
    aten.slice: _slice,
    aten.new_zeros: _new_zeros,
    aten.copy_: _copy,
    aten.view: _view,
    aten.as_strided: _as_strided,
}

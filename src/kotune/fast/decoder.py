"""The fast training forward of the decoders :mod:`kotune.fast.families` lists: same function, leaner path.

It reads the modules of a peft-wrapped transformers model (never replaces them) and computes the summed
next-token loss of a batch:

    embed (x sqrt(hidden) for Gemma) -> [norm? -> q,k,v (+LoRA) -> q/k norm? -> RoPE? -> causal attention
              (windowed?) -> o (+LoRA) -> norm? -> residual -> norm? -> gate, up (+LoRA) -> act(gate) * up
              -> down (+LoRA) -> norm? -> residual] x layers
          -> RMSNorm -> chunked linear cross-entropy

each "?" being an option of the layer's :class:`~kotune.fast.families.LayerSpec` (Llama: norms before attention
and MLP, RoPE, SiLU), in the compute dtype, with no fp32 copies of embeddings or the output layer, 4-bit weights
dequantized per use (:mod:`kotune.fast.lora`), layers checkpointed with optional host offload
(:mod:`kotune.fast.checkpoint`) and packed rows kept apart by variable-length attention
(:mod:`kotune.fast.attention`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kotune.data.batching import to_device
from kotune.fast.attention import causal_attention, packed_attention
from kotune.fast.checkpoint import ActivationStore, checkpointed
from kotune.fast.families import ATTENTION, MLP, LayerSpec, family, unsupported_reason
from kotune.fast.lora import Projection, UnsupportedModule, project, read_projection
from kotune.fast.loss import linear_cross_entropy_sum, linear_sequence_logps, linear_token_logps
from kotune.fast.ops import Ops
from kotune.fast.tiled import TILE_FROM, tiled


@dataclass
class Rows:
    """Per-forward inputs every layer needs: rotary tables by name and, for packed rows, where each row starts."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    cu_seqlens: torch.Tensor | None
    bounds: list[int] | None
    training: bool
    casts: dict | None = None
    """A training pass's adapter in the compute dtype, filled as the layers first use it (``lora.adapter_in``);
    None: cast at each use (generation, whose CUDA graphs must read the adapter as it is at each replay)."""


Attend = Callable[["DecoderLayer", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(layer, q [b, heads, t, d], k, v [b, kv_heads, t, d]) -> [b, heads, t, d]``, rotary embedding applied."""


def norm_eps(norm: torch.nn.Module) -> float:
    """An RMSNorm module's epsilon, whichever name its family gives it."""
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps  # Llama's / Gemma's name


class DecoderLayer:
    """One decoder layer's computation over the module's own weights, as its :class:`LayerSpec` says."""

    def __init__(self, layer: torch.nn.Module, ops: Ops, spec: LayerSpec):
        attn, mlp = layer.self_attn, layer.mlp
        self.module, self.spec = layer, spec
        self.proj: dict[str, Projection] = {n: read_projection(getattr(attn, n)) for n in ATTENTION}
        self.proj.update({n: read_projection(getattr(mlp, n)) for n in MLP})
        self.norms = tuple(None if name is None else getattr(layer, name) for name in spec.norms)
        self.qk_norms = (attn.q_norm, attn.k_norm) if spec.qk_norm else None
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        # the module's own scale, passed on only where it is not SDPA's default (Gemma's query_pre_attn_scalar)
        self.scale = None if attn.scaling == self.head_dim**-0.5 else attn.scaling
        self._rms = ops.gemma_rms_norm if spec.gemma_norm else ops.rms_norm
        self._act = ops.gelu_tanh_mul if spec.activation == "gelu_tanh" else ops.silu_mul
        self.ops = ops
        self._params = [p for proj in self.proj.values() for p in proj.trainable()]
        self._mlp_params = [p for n in MLP for p in self.proj[n].trainable()]
        self._mlp_dropout = any(self.proj[n].dropout > 0 for n in MLP)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The layer's trainable (LoRA) tensors."""
        return self._params

    def gathered(self):
        """A block in which the layer's weights are whole: FSDP2 all-gathers them on entry and frees them on exit
        when the layer is sharded (``kotune.training.fsdp``); nothing to do otherwise."""
        if hasattr(self.module, "unshard"):
            return _Gathered(self.module)
        return contextlib.nullcontext()

    def _norm(self, x: torch.Tensor, norm: torch.nn.Module | None, in_place: bool = True) -> torch.Tensor:
        return x if norm is None else self._rms(x, norm.weight, norm_eps(norm), in_place)

    def _attention(self, h: torch.Tensor, rows: Rows, attend: Attend | None) -> torch.Tensor:
        b, t, _ = h.shape
        p, train = self.proj, rows.training
        q, k, v = (project(h, p[n], train, rows.casts).view(b, t, -1, self.head_dim) for n in ATTENTION[:3])
        if self.qk_norms is not None:
            q, k = self._norm(q, self.qk_norms[0]), self._norm(k, self.qk_norms[1])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.spec.rope is not None:
            q, k = self.ops.rope(q, k, *rows.rope[self.spec.rope])
        window = self.spec.window
        if attend is not None:
            a = attend(self, q, k, v)
        elif rows.cu_seqlens is None:
            a = causal_attention(q, k, v, self.groups, self.scale, window)
        else:
            a = packed_attention(q, k, v, self.groups, rows.cu_seqlens, rows.bounds, self.scale, window)
        return project(a.transpose(1, 2).reshape(b, t, -1), p["o_proj"], train, rows.casts)

    def __call__(self, x: torch.Tensor, rows: Rows, attend: Attend | None = None) -> torch.Tensor:
        """The layer's output for ``x``; ``attend(layer, q, k, v)``, when given, computes the attention instead
        of the causal or packed kernels (generation's, over its KV cache: ``kotune.fast.generation``)."""
        train = rows.training
        attn_in, attn_out, mlp_in, mlp_out = self.norms
        # a norm after attention or MLP feeds the residual sum: its gradient is shared, so not overwritten in place
        x = x + self._norm(self._attention(self._norm(x, attn_in), rows, attend), attn_out, in_place=False)
        h = self._norm(x, mlp_in)
        if h.shape[0] * h.shape[1] > TILE_FROM:  # a long pass: the MLP's activations a slice at a time
            m = tiled(lambda t: self._mlp(t, train, rows.casts), h, self._mlp_params, train and self._mlp_dropout)
        else:
            m = self._mlp(h, train, rows.casts)
        return x + self._norm(m, mlp_out, in_place=False)

    def _mlp(self, h: torch.Tensor, train: bool, casts: dict | None) -> torch.Tensor:
        p = self.proj
        m = self._act(project(h, p["gate_proj"], train, casts), project(h, p["up_proj"], train, casts))
        return project(m, p["down_proj"], train, casts)


class Decoder:
    """The parts of a transformers decoder the fast path computes with, read from a (base) model: its
    embedding, final norm, rotary module, output layer and one :class:`DecoderLayer` per layer."""

    def __init__(self, base: torch.nn.Module, fused: bool, triton_dequant: bool = True):
        reason = unsupported_reason(base.config, [])
        if reason:
            raise UnsupportedModule(reason)
        inner = base.model.language_model if hasattr(base.model, "language_model") else base.model  # Gemma 3's
        spec = family(base.config)
        self.embed, self.norm = inner.embed_tokens, inner.norm
        self.rotary, self.head = inner.rotary_emb, base.get_output_embeddings()
        if getattr(self.head.weight, "quant_state", None) is not None:
            raise UnsupportedModule("a quantized output layer")
        if len(inner.layers) != len(spec.layers) or spec.embed_scale != hasattr(inner.embed_tokens, "embed_scale"):
            raise UnsupportedModule(f"{type(inner).__name__} does not have the layers its config describes")
        self.ops = Ops(fused)
        self.final_norm = self.ops.gemma_rms_norm if spec.gemma_norm else self.ops.rms_norm
        # the rotary tables the layers read: the model's one, or one per layer type (Gemma 3)
        self.tables = sorted({s.rope for s in spec.layers if s.rope is not None})
        self.layers = [DecoderLayer(layer, self.ops, s) for layer, s in zip(inner.layers, spec.layers, strict=True)]
        for proj in (p for layer in self.layers for p in layer.proj.values()):
            proj.triton_dequant = triton_dequant


def rotary_tables(rotary: torch.nn.Module, names: list[str], x: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """(cos, sin) of ``position_ids`` from the model's rotary module, for each table name the layers read."""
    return {n: rotary(x, position_ids) if n == "default" else rotary(x, position_ids, n) for n in names}


class _Gathered:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.unshard()

    def __exit__(self, *exc):
        self.module.reshard()


class HostEmbedding:
    """The input embedding table kept in host memory: a forward needs only its batch's rows (1 GiB saved at 8B).

    Rows are gathered on the CPU into one of two reused pinned buffers and copied to the device
    asynchronously; before a buffer is refilled, the copy out of it two forwards ago must be done (an event
    says when, so the host waits for that copy only, not for the device's queue).
    """

    def __init__(self, module: torch.nn.Embedding):
        module.to("cpu")
        self.weight = module.weight.detach()
        # Gemma's embedding multiplies its rows by sqrt(hidden) in its forward, which this bypasses
        scale = getattr(module, "embed_scale", None)
        self.scale = None if scale is None else scale.to(self.weight.dtype).item()
        self._buffers = [torch.empty(0, dtype=self.weight.dtype)] * 2
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def __call__(self, input_ids: torch.Tensor, host_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``input_ids`` on its device; ``host_ids``, the same ids on the host, spare a read back."""
        ids = input_ids.reshape(-1).cpu() if host_ids is None else host_ids
        n, dim, turn = ids.numel(), self.weight.shape[1], self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        if self._buffers[turn].numel() < n * dim:
            self._buffers[turn] = torch.empty(n * dim, dtype=self.weight.dtype, pin_memory=True)
        rows = self._buffers[turn][: n * dim].view(n, dim)
        torch.index_select(self.weight, 0, ids, out=rows)
        on_device = rows.to(input_ids.device, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        if self.scale is not None:
            on_device = on_device * self.scale  # as the module's forward: rows times the scale in their dtype
        return on_device.view(*input_ids.shape, dim)


class FastCausalLM(torch.nn.Module):
    """``forward(**batch)`` -> summed next-token loss (fp32), like the plain path's ``training.build.loss_sum``."""

    def __init__(
        self,
        peft_model,
        compute_dtype: torch.dtype,
        checkpoint: bool,
        offload: bool,
        fused: bool,
        host_embeddings: bool = False,
        triton_dequant: bool = True,
    ):
        """``offload``: layer inputs wait in host memory; ``fused``: liger kernels; ``host_embeddings``: the
        input embedding table moves to host memory (untied embeddings on CUDA only); ``triton_dequant``: NF4
        weights dequantized by ``kotune.fast.nf4``."""
        super().__init__()
        self.model = peft_model  # registered, so parameters() and DDP see the adapter
        self.dtype_, self.checkpoint = compute_dtype, checkpoint
        d = Decoder(peft_model.get_base_model(), fused, triton_dequant)
        self.ops, self.layers, self._final_norm, self._tables = d.ops, d.layers, d.final_norm, d.tables
        self._parts = (d.embed, d.norm, d.rotary, d.head)
        device = d.head.weight.device  # the output layer's: the embedding may already be in host memory
        self.store = ActivationStore(device, offload)
        tied = d.embed.weight.data_ptr() == d.head.weight.data_ptr()
        self.host_embedding = None
        if host_embeddings and device.type == "cuda" and not tied:
            self.host_embedding = HostEmbedding(d.embed)
        else:  # where an earlier fast model of this peft model may have left it
            d.embed.to(device)

    def forward(
        self, input_ids, labels, position_ids=None, cu_seqlens=None, per_sequence=False, host=None, temperature=None
    ):
        """Summed loss of ``labels`` (right-padded batch, or one packed row with ``position_ids``/``cu_seqlens``);
        ``per_sequence``: (summed log-probability of each sequence's labels, their count) instead, the sequences
        being the batch's rows or the packed row's segments (what preference objectives need); ``temperature``:
        each labelled token's log-probability ``[batch, seq - 1]`` at that temperature instead (GRPO's); ``host``
        (:class:`kotune.fast.HostSide`) spares the forward every read back from the device."""
        embed, norm, rotary, head = self._parts
        device = input_ids.device
        with torch.autocast(device.type, enabled=False):
            if self.host_embedding is not None:
                x = self.host_embedding(input_ids, host.ids if host is not None else None)
            else:
                x = embed(input_ids)
            x = x.to(self.dtype_)
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=device)[None].expand(input_ids.shape[0], -1)
            tables = rotary_tables(rotary, self._tables, x, position_ids)
            if host is not None:
                bounds = host.bounds
            else:
                bounds = None if cu_seqlens is None else cu_seqlens.tolist()
            training = self.training and torch.is_grad_enabled()
            rows = Rows(tables, cu_seqlens, bounds, training, {} if training else None)
            keep = self.checkpoint and torch.is_grad_enabled()
            rng = rows.training and any(p.dropout > 0 for layer in self.layers for p in layer.proj.values())
            for i, layer in enumerate(self.layers):
                if keep:
                    x = checkpointed(layer, x, (rows,), self.store, i, rng)
                else:
                    with layer.gathered():
                        x = layer(x, rows)
            x = self._final_norm(x, norm.weight, norm_eps(norm))
            if temperature is not None:
                return linear_token_logps(x, head.weight.to(self.dtype_), labels, temperature)
            if per_sequence:
                return linear_sequence_logps(x, head.weight.to(self.dtype_), labels, cu_seqlens)
            keep = None if host is None else to_device(host.keep, device)
            return linear_cross_entropy_sum(x, head.weight.to(self.dtype_), labels, keep=keep)

"""The fast training forward for Llama-shaped decoders (Llama, Mistral, Qwen2): same function, leaner path.

It reads the modules of a peft-wrapped transformers model (never replaces them) and computes the summed
next-token loss of a batch:

    embed -> [RMSNorm -> q,k,v (+LoRA) -> RoPE -> causal attention -> o (+LoRA) -> residual
              -> RMSNorm -> gate, up (+LoRA) -> SiLU(gate) * up -> down (+LoRA) -> residual] x layers
          -> RMSNorm -> chunked linear cross-entropy

in the compute dtype, with no fp32 copies of embeddings or the output layer, 4-bit weights dequantized per
use (:mod:`kotune.fast.lora`), layers checkpointed with optional host offload (:mod:`kotune.fast.checkpoint`)
and packed rows kept apart by variable-length attention (:mod:`kotune.fast.attention`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kotune.data.batching import to_device
from kotune.fast.attention import causal_attention, packed_attention
from kotune.fast.checkpoint import ActivationStore, checkpointed
from kotune.fast.lora import Projection, UnsupportedModule, project, read_projection
from kotune.fast.loss import linear_cross_entropy_sum, linear_sequence_logps
from kotune.fast.ops import Ops

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Rows:
    """Per-forward inputs every layer needs: rotary tables and, for packed rows, where each row starts."""

    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor | None
    bounds: list[int] | None
    training: bool


class DecoderLayer:
    """One decoder layer's computation over the module's own weights."""

    def __init__(self, layer: torch.nn.Module, ops: Ops):
        attn, mlp = layer.self_attn, layer.mlp
        self.module = layer
        self.proj: dict[str, Projection] = {n: read_projection(getattr(attn, n)) for n in ATTENTION}
        self.proj.update({n: read_projection(getattr(mlp, n)) for n in MLP})
        self.norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.ops = ops
        self._params = [p for proj in self.proj.values() for p in proj.trainable()]

    def parameters(self) -> list[torch.nn.Parameter]:
        """The layer's trainable (LoRA) tensors."""
        return self._params

    def gathered(self):
        """A block in which the layer's weights are whole: FSDP2 all-gathers them on entry and frees them on exit
        when the layer is sharded (``kotune.training.fsdp``); nothing to do otherwise."""
        if hasattr(self.module, "unshard"):
            return _Gathered(self.module)
        return contextlib.nullcontext()

    def _norm(self, x: torch.Tensor, which: int) -> torch.Tensor:
        norm = self.norms[which]
        return self.ops.rms_norm(x, norm.weight, norm.variance_epsilon)

    def __call__(self, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        b, t, _ = x.shape
        p, train = self.proj, rows.training
        h = self._norm(x, 0)
        q, k, v = (project(h, p[n], train).view(b, t, -1, self.head_dim).transpose(1, 2) for n in ATTENTION[:3])
        q, k = self.ops.rope(q, k, rows.cos, rows.sin)
        if rows.cu_seqlens is None:
            a = causal_attention(q, k, v, self.groups)
        else:
            a = packed_attention(q, k, v, self.groups, rows.cu_seqlens, rows.bounds)
        x = x + project(a.transpose(1, 2).reshape(b, t, -1), p["o_proj"], train)
        h = self._norm(x, 1)
        m = self.ops.silu_mul(project(h, p["gate_proj"], train), project(h, p["up_proj"], train))
        return x + project(m, p["down_proj"], train)


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
        return on_device.view(*input_ids.shape, dim)


SUPPORTED = ("llama", "mistral", "qwen2")


def unsupported_reason(config, lora_targets) -> str | None:
    """Why the fast path cannot compute this model exactly (None when it can), from configs alone."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (the fast path knows {', '.join(SUPPORTED)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    window = getattr(config, "sliding_window", None)
    if window is not None and (kind != "qwen2" or getattr(config, "use_sliding_window", False)):
        return "sliding-window attention"
    targets = [lora_targets] if isinstance(lora_targets, str) else list(lora_targets)
    extra = [t for t in targets if t != "all-linear" and t not in ATTENTION + MLP]
    if extra:
        return f"LoRA targets outside the decoder's linear layers: {extra}"
    return None


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
        base = peft_model.get_base_model()
        reason = unsupported_reason(base.config, [])
        if reason:
            raise UnsupportedModule(reason)
        inner = base.model
        self.dtype_, self.checkpoint = compute_dtype, checkpoint
        self._parts = (inner.embed_tokens, inner.norm, inner.rotary_emb, base.get_output_embeddings())
        if getattr(self._parts[3].weight, "quant_state", None) is not None:
            raise UnsupportedModule("a quantized output layer")
        self.ops = Ops(fused)
        self.layers = [DecoderLayer(layer, self.ops) for layer in inner.layers]
        for proj in (p for layer in self.layers for p in layer.proj.values()):
            proj.triton_dequant = triton_dequant
        device = self._parts[3].weight.device  # the output layer's: the embedding may already be in host memory
        self.store = ActivationStore(device, offload)
        tied = inner.embed_tokens.weight.data_ptr() == self._parts[3].weight.data_ptr()
        self.host_embedding = None
        if host_embeddings and device.type == "cuda" and not tied:
            self.host_embedding = HostEmbedding(inner.embed_tokens)
        else:  # where an earlier fast model of this peft model may have left it
            inner.embed_tokens.to(device)

    def forward(self, input_ids, labels, position_ids=None, cu_seqlens=None, per_sequence=False, host=None):
        """Summed loss of ``labels`` (right-padded batch, or one packed row with ``position_ids``/``cu_seqlens``);
        ``per_sequence``: (summed log-probability of each sequence's labels, their count) instead, the sequences
        being the batch's rows or the packed row's segments (what preference objectives need); ``host``
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
            cos, sin = rotary(x, position_ids)
            if host is not None:
                bounds = host.bounds
            else:
                bounds = None if cu_seqlens is None else cu_seqlens.tolist()
            rows = Rows(cos, sin, cu_seqlens, bounds, self.training and torch.is_grad_enabled())
            keep = self.checkpoint and torch.is_grad_enabled()
            rng = rows.training and any(p.dropout > 0 for layer in self.layers for p in layer.proj.values())
            for i, layer in enumerate(self.layers):
                if keep:
                    x = checkpointed(layer, x, (rows,), self.store, i, rng)
                else:
                    with layer.gathered():
                        x = layer(x, rows)
            x = self.ops.rms_norm(x, norm.weight, norm.variance_epsilon)
            if per_sequence:
                return linear_sequence_logps(x, head.weight.to(self.dtype_), labels, cu_seqlens)
            keep = None if host is None else to_device(host.keep, device)
            return linear_cross_entropy_sum(x, head.weight.to(self.dtype_), labels, keep=keep)

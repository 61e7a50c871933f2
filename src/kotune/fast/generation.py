"""Generation over the fast path's layers: a KV cache allocated once, and on CUDA each decode step replayed as
one recorded CUDA graph.

transformers' generation runs a peft 4-bit model module by module: for an 8B model about 3,000 kernel launches a
new token, each issued from Python, three of them per weight for bitsandbytes' dequantization alone, so a batch of
64 completions waits on the host, not on the GPU. Here the layers are the training path's
(:class:`kotune.fast.decoder.DecoderLayer`: the same weights, the LoRA adapter applied unmerged, NF4 dequantized by
one Triton kernel), keys and values go into a cache sized once for the prompts plus ``max_new_tokens``, and a
decode step (every layer, the final norm, the output layer) is recorded as a CUDA graph after its first run and
replayed for every later token: one launch a token from the host. The adapter is read at each replay, so a graph
follows the training that updates it in place.

Rows are left-padded prompts, so every row's next token goes into the same cache column. A boolean mask says which
columns each row attends to: its own tokens, not its padding. Rows that stopped keep decoding (their new columns
masked out), so the batch keeps its shape and its graph. A layer with a sliding window of W also drops columns
at or before i - W, as in training (:mod:`kotune.fast.attention`): a row's tokens are consecutive columns.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kotune.fast.decoder import Decoder, DecoderLayer, HostEmbedding, Rows, norm_eps, rotary_tables
from kotune.fast.families import gpu_unchecked_reason, unsupported_reason
from kotune.fast.lora import UnsupportedModule

CACHE_STEP = 16
"""Cache lengths are rounded up to a multiple of this: the attention mask's rows stay aligned as the
memory-efficient attention kernel wants them."""
PREFILL_TOKENS = 1024
"""The prompts run into the cache a few rows at a time, about this many tokens a pass, so the prefill's
activations stay small beside the cache (a GRPO step prefills 64 prompts)."""


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (padding gets 0: it is masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def unusable_reason(model) -> str | None:
    """Why :class:`FastGenerator` cannot generate for ``model`` (None when it can): it computes exactly what the
    training fast path computes, on the families that path has checked on this kind of device."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = unsupported_reason(base.config, [])
    head = base.get_output_embeddings()
    if reason is None and head.weight.is_cuda:
        reason = gpu_unchecked_reason(base.config)
    embed = base.get_input_embeddings()
    if reason is None and (type(head) is not torch.nn.Linear or not isinstance(embed, torch.nn.Embedding)):
        reason = "an adapter on the embedding or output layer"
    return reason


class FastGenerator:
    """``start(ids, mask, max_new_tokens)`` -> the next token's logits; ``step(token, going)`` -> the following
    token's. Logits are float32 ``[batch, vocab]``, valid until the next call; ``release()`` frees the cache."""

    def __init__(self, model, graphs: bool = True):
        """``model``: a peft model or a plain transformers one of a supported family (:func:`unusable_reason`);
        ``graphs``: record decode steps as CUDA graphs (on CUDA)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.d = Decoder(base, fused=True)
        self.dtype = self.d.head.weight.dtype
        self.device = self.d.head.weight.device
        self.graphs = graphs and self.device.type == "cuda"
        # where the training fast path keeps the embedding table in host memory, rows are gathered there too
        on_host = self.d.embed.weight.device.type == "cpu" and self.device.type == "cuda"
        self.host = HostEmbedding(self.d.embed) if on_host else None
        self.windows = sorted({layer.spec.window for layer in self.d.layers if layer.spec.window is not None})
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._graph: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None

    # -- the cache ---------------------------------------------------------------------------------------
    def _allocate(self, batch: int, length: int) -> None:
        self.release()  # the old cache goes before the new one comes
        kw = {"dtype": self.dtype, "device": self.device}
        for layer in self.d.layers:
            heads = layer.proj["k_proj"].base.out_features // layer.head_dim
            self.k.append(torch.zeros(batch, heads, length, layer.head_dim, **kw))
            self.v.append(torch.zeros(batch, heads, length, layer.head_dim, **kw))
        # what a decode step reads, in tensors a recorded graph keeps reading: the new tokens' embeddings, their
        # positions and column, and per window the columns each row attends to
        self.x = torch.zeros(batch, 1, self.d.embed.weight.shape[1], **kw)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.column = torch.zeros(1, dtype=torch.long, device=self.device)
        self.masks = {w: torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=self.device) for w in self._keys()}

    def release(self) -> None:
        """Free the cache and the recorded graph (the next ``start`` allocates them again)."""
        self.k, self.v, self._graph = [], [], None

    def _keys(self) -> list[int | None]:
        return [None, *self.windows]

    # -- prefill and decode ------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the left-padded prompts ``ids`` (``mask``: 1 on real tokens) into a fresh cache."""
        batch, width = ids.shape
        length = -(-(width + max_new_tokens) // CACHE_STEP) * CACHE_STEP
        self._allocate(batch, length)
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        self.valid[:, :width] = mask.bool()
        self.next_column = width
        pos = positions(mask)
        self.position.copy_(pos[:, -1:])
        columns = torch.arange(length, device=self.device)
        query = columns[:width, None]
        logits, chunk = [], max(1, PREFILL_TOKENS // width)
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            # a padding query sees itself, so no row of the softmax is empty (its output is never read)
            allowed = (columns[None] <= query) & self.valid[rows, None] | (columns[None] == query)
            masks = {
                w: (allowed if w is None else allowed & (columns[None] > query - w))[:, None] for w in self._keys()
            }
            logits.append(self._forward(self._embed(ids[rows]), pos[rows], columns[:width], masks, rows))
        return torch.cat(logits)

    @torch.no_grad()
    def step(self, token: torch.Tensor, going: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``going``: False for rows that already stopped, whose tokens are masked)."""
        c = self.next_column
        self.next_column += 1
        self.valid[:, c] = going
        columns = torch.arange(self.valid.shape[1], device=self.device)
        for w, m in self.masks.items():
            m.copy_((self.valid if w is None else self.valid & (columns > c - w))[:, None, None])
        self.x.copy_(self._embed(token[:, None]))  # outside the graph: the table may be in host memory
        self.position += 1
        self.column.fill_(c)
        if not self.graphs:
            return self._decode()
        if self._graph is None:  # first step: run it (kernels compile, workspaces settle), then record it
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = self._decode()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._graph = (graph, self._decode())
            return logits
        self._graph[0].replay()
        return self._graph[1]

    def _decode(self) -> torch.Tensor:
        return self._forward(self.x, self.position, self.column, self.masks)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.d.embed(ids) if self.host is None else self.host(ids)).to(self.dtype)

    def _forward(self, x, pos, columns, masks, rows: slice = slice(None)) -> torch.Tensor:
        """Logits after the last column of ``x`` (embedded tokens), for the batch ``rows`` of the cache (all of
        them: a decode step)."""
        d = self.d
        tables = Rows(rotary_tables(d.rotary, d.tables, x, pos), None, None, training=False)
        for i, layer in enumerate(d.layers):
            x = layer(x, tables, functools.partial(self._attend, i, rows, columns, masks))
        x = d.final_norm(x[:, -1].contiguous(), d.norm.weight, norm_eps(d.norm))
        return (x @ d.head.weight.to(self.dtype).T).float()

    def _attend(self, i: int, rows: slice, columns, masks, layer: DecoderLayer, q, k, v) -> torch.Tensor:
        """Write the pass's keys and values into layer ``i``'s cache (its batch ``rows``) at ``columns``, attend
        over the cache."""
        keys, values = self.k[i][rows], self.v[i][rows]
        keys.index_copy_(2, columns, k)
        values.index_copy_(2, columns, v)
        b, heads, t, dim = q.shape
        groups = heads // keys.shape[1]
        mask = masks[layer.spec.window]  # [b, 1, t, length]
        if groups > 1:  # each key/value head's queries in one row block: no copies of the cache per query head
            q = q.reshape(b, keys.shape[1], groups * t, dim)
            mask = mask.expand(b, 1, groups, mask.shape[-1]) if t == 1 else mask.repeat(1, 1, groups, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scale)
        return out.reshape(b, heads, t, dim)


def fast_generator(model) -> FastGenerator | None:
    """A :class:`FastGenerator` for ``model`` on CUDA, None where transformers' own forward must generate."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not head.weight.is_cuda or unusable_reason(model) is not None:
        return None
    try:
        return FastGenerator(model)
    except UnsupportedModule:  # 8-bit weights, several or merged adapters, DoRA
        return None

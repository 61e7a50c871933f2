"""Linear + cross-entropy in row chunks: the loss of a 128k vocabulary without its full fp32 logits (and the
per-sequence log-probabilities preference objectives need, and GRPO's per-token ones, the same way).

The plain path computes ``lm_head(h)`` for every position (seq x 128,256 logits, upcast to fp32: 1 GiB at
2,048 tokens) and then the loss. Here only positions with a label are projected, a chunk of rows at a time;
for each chunk the loss and, when a gradient is needed, the gradient of the hidden rows are computed at once
(softmax minus one-hot, times the weight), so backward only scales a stored [rows, hidden] tensor. Peak extra
memory is one chunk's logits. The maths is the plain path's: logits from a matrix product in the weight's
dtype, log-softmax in fp32, summed over the labelled rows.
"""

from __future__ import annotations

import torch

from kotune.data.examples import IGNORE

LOGIT_ELEMENTS_PER_CHUNK = 1 << 24
"""fp32 logits held at once (64 MiB): 128 rows of a 128,256-word vocabulary."""


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: one chunk's fp32 logits near ``LOGIT_ELEMENTS_PER_CHUNK``, a multiple of 64 when large."""
    rows = max(1, LOGIT_ELEMENTS_PER_CHUNK // vocab_size)
    return rows // 64 * 64 if rows >= 64 else rows


class _LinearTokenLogps(torch.autograd.Function):
    """Per row ``log softmax(hidden @ weight.T)[target]``; each row's gradient is stored at forward and scaled by
    that row's incoming gradient at backward (a row's log-probability depends on its hidden row alone)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, temperature=1.0):
        need_grad = ctx.needs_input_grad[0]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = (h @ weight.T).float()
            if temperature != 1.0:  # GRPO: the distribution sampled is softmax(logits / temperature)
                logits.div_(temperature)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(peak).exp_()
            sums = exp.sum(dim=1)
            out[start : start + rows] = picked - peak.squeeze(1) - sums.log()
            if need_grad:
                # d logp / d logits = one_hot(target) - softmax, built in place
                probs = exp.div_(sums[:, None]).neg_()
                probs[torch.arange(t.shape[0], device=t.device), t] += 1.0
                if temperature != 1.0:
                    probs.div_(temperature)
                grad_rows[start : start + rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_rows)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_out[:, None].to(grad_rows.dtype), None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rows: int | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of ``hidden [batch, seq, dim]`` against ``labels [batch, seq]``.

    Position ``t`` predicts ``labels[:, t + 1]``; positions whose next label is -100 are dropped before the
    projection, so prompt and padding tokens cost nothing. ``weight`` (the output embedding) must be frozen.
    ``keep``: those positions (flat indices into ``labels[:, 1:]``), found on the host beforehand; finding
    them here waits for the device.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_sum needs a frozen output weight (LoRA training)")
    targets = labels[:, 1:].reshape(-1)
    if keep is None:
        keep = (targets != IGNORE).nonzero().squeeze(1)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    if keep.numel() == 0:
        return (flat.sum() * 0.0).float()  # keeps the graph connected when a micro-batch has no labelled token
    rows = rows or chunk_rows(weight.shape[0])
    logps = _LinearTokenLogps.apply(flat.index_select(0, keep), weight, targets.index_select(0, keep), rows)
    return -logps.sum()


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's labelled next tokens (fp32), their count), without full logits.

    Sequences are the rows of ``hidden [batch, seq, dim]`` / ``labels [batch, seq]``, or with ``cu_seqlens`` the
    segments of one packed row (each segment's first label must be -100, as ``collate_packed`` makes it).
    Only labelled positions are projected, a chunk of rows at a time, as in ``linear_cross_entropy_sum``.
    """
    if weight.requires_grad:
        raise ValueError("linear_sequence_logps needs a frozen output weight (LoRA training)")
    batch, seq = labels.shape
    if cu_seqlens is None:
        owner = torch.arange(batch, device=labels.device)[:, None].expand(batch, seq - 1).reshape(-1)
        n_sequences = batch
    else:
        starts = cu_seqlens[1:-1].to(labels.device)
        owner = torch.bucketize(torch.arange(1, seq, device=labels.device), starts, right=True)
        n_sequences = cu_seqlens.numel() - 1
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    sums = (flat.sum() * 0.0).float().expand(n_sequences).clone()  # zeros that keep the graph connected
    counts = torch.zeros(n_sequences, dtype=torch.long, device=labels.device)
    if keep.numel() == 0:
        return sums, counts
    rows = rows or chunk_rows(weight.shape[0])
    logps = _LinearTokenLogps.apply(flat.index_select(0, keep), weight, targets.index_select(0, keep), rows)
    which = owner.index_select(0, keep)
    return sums.index_add(0, which, logps), counts.index_add(0, which, torch.ones_like(which))


def linear_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, rows: int | None = None
) -> torch.Tensor:
    """Log-probability of each labelled next token ``[batch, seq - 1]`` (fp32, 0 where unlabelled) with the logits
    divided by ``temperature``, without full logits: what GRPO's per-token ratio needs."""
    if weight.requires_grad:
        raise ValueError("linear_token_logps needs a frozen output weight (LoRA training)")
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    out = (flat.sum() * 0.0).float().expand(targets.numel()).clone()  # zeros that keep the graph connected
    if keep.numel():
        rows = rows or chunk_rows(weight.shape[0])
        picked = _LinearTokenLogps.apply(
            flat.index_select(0, keep), weight, targets.index_select(0, keep), rows, temperature
        )
        out = out.index_add(0, keep, picked)
    return out.view(labels.shape[0], labels.shape[1] - 1)


def reference_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path's maths, for tests: full logits, fp32 log-softmax, summed over labelled positions."""
    logits = hidden[:, :-1] @ weight.T
    logits = logits if logits.dtype == torch.float64 else logits.float()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")

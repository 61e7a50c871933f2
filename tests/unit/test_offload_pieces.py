"""Layer inputs parked in host memory are pinned in fixed-size pieces (``kotune.fast.checkpoint``)."""

from __future__ import annotations

import pytest
import torch

from kotune.fast import checkpoint
from kotune.fast.checkpoint import ActivationStore, pieces


def test_pieces_cover_the_tensor_with_whole_power_of_two_pieces_then_the_rest():
    per = checkpoint.PIECE_BYTES // 2  # bf16 elements in one piece
    assert pieces(per * 3 + 5, 2) == [per, per, per, 5]
    assert pieces(per * 2, 2) == [per, per]
    assert pieces(7, 4) == [7]
    # a 344,064-token layer input of an 8B model: 2.7 GiB in 42 pieces, under 2.76 GiB pinned (one buffer: 4 GiB)
    sizes = pieces(344_064 * 4096, 2)
    assert sum(sizes) == 344_064 * 4096 and len(sizes) == 42
    assert (len(sizes) - 1) * checkpoint.PIECE_BYTES + 2 * sizes[-1] * 2 < 2.76 * 2**30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_layer_input_comes_back_whole_from_several_pieces(monkeypatch):
    monkeypatch.setattr(checkpoint, "PIECE_BYTES", 4096)
    store = ActivationStore(torch.device("cuda"), offload=True)
    xs = [torch.randn(3, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    handles = [store.put(i, x) for i, x in enumerate(xs)]
    back = [store.get(i, h) for i, h in reversed(list(enumerate(handles)))]
    torch.cuda.synchronize()
    assert torch.equal(back[0], xs[1]) and torch.equal(back[1], xs[0])
    assert len(store._host[0]) == len(pieces(xs[0].numel(), 2)) > 1

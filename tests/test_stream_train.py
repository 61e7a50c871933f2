"""A run from a streamed source (``data.streaming``) trains from the cache's memory-mapped shards the steps, losses
and adapter of the same run with the source read whole."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from kotune.training.recipe import train


def test_a_streamed_run_is_the_run_read_whole(tiny_train_config, tmp_path, monkeypatch):
    from kotune.data import stream

    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stream, "CHUNK_ROWS", 5)  # 24 rows: five shards
    overrides = {"train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2}
    train(tiny_train_config(tmp_path / "whole", overrides))
    train(tiny_train_config(tmp_path / "streamed", overrides | {"data.streaming": "true"}))
    assert len(list((tmp_path / "cache" / "data").glob("*-stream/shard-*.npz"))) == 5

    def logged(run):
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, (run / "metrics.jsonl").open())]

    assert logged(tmp_path / "streamed") == logged(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "streamed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)

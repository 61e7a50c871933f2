"""A run on a two-source mixture reports each source's held-out loss next to the overall one (the overall is the
two weighted by their trained tokens, as one loss over all held-out rows is)."""

from __future__ import annotations

import json
import math

from conftest import TINY_TRAIN_ROWS, write_jsonl

from kotune.data.prepare import prepare
from kotune.model.load import load_tokenizer
from kotune.training.recipe import train


def test_each_source_has_its_held_out_loss(tiny_train_config, tmp_path, monkeypatch):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    ko = write_jsonl(tmp_path / "ko.jsonl", TINY_TRAIN_ROWS[:12])
    other = [{"prompt": f"Q{i}: why is the sky blue?", "completion": f"A{i}: scattering."} for i in range(12)]
    en = write_jsonl(tmp_path / "en.jsonl", other)
    sources = [{"path": str(ko), "name": "ko", "weight": 2}, {"path": str(en), "name": "en", "weight": 1}]
    overrides = {"data.sources": json.dumps(sources), "data.val_size": 0.25, "train.max_steps": 2}
    cfg = tiny_train_config(tmp_path / "run", overrides | {"train.eval_steps": 2, "train.save_steps": 2})
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in records if "eval_loss" in r]
    data = prepare(cfg.data, load_tokenizer(cfg.model.path, cfg.model), log=lambda _: None)
    tokens = {name: 0 for name in ("ko", "en")}
    for e in data.validation:
        tokens[data.source_names[e.source]] += sum(1 for t in e.labels[1:] if t != -100)
    assert all(n > 0 for n in tokens.values())
    mixed = sum(last[f"eval_loss[{n}]"] * tokens[n] for n in tokens) / sum(tokens.values())
    assert math.isclose(last["eval_loss"], mixed, rel_tol=1e-5)
    assert last["eval_loss[ko]"] != last["eval_loss[en]"]

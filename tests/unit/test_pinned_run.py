"""Pinned first losses: a tiny fixed-seed run through ``kotune train`` must write ``metrics.jsonl`` byte for byte
as committed in ``tests/unit/pinned/``. A refactor that should not change the maths keeps this file green.

What the run is: a random 2-layer Llama (hidden 32, weights drawn from a seeded generator by name) on the byte-level
mock tokenizer, no quantization, float32 on the CPU with one thread, 10 alpaca rows (8 train / 2 validation),
4 optimizer steps of 2 micro-batches of 2 rows, LoRA dropout on (so RNG order matters), evaluation before the first
step and every 2 steps, a checkpoint every 2 steps. ``pinned/metrics-packed.jsonl`` pins the same run with
``train.packing: on``; a third test breaks the pinned run's last checkpoint, resumes, and must get the pinned bytes
again.

The only wall-clock figures in ``metrics.jsonl`` (``tokens_per_s``, ``input_tokens_per_s``) come from
``time.perf_counter``; the test holds that clock still (patched on the ``time`` module itself, so no kotune module
path is involved) and the figures are then kotune's own ``0.0`` for a zero-length window.

To repin after an intentional change of the maths (or of torch), run

    KOTUNE_REPIN=1 python -m pytest -q tests/unit/test_pinned_run.py

and commit the new files in ``tests/unit/pinned/`` with a note on why the numbers moved. The file's exact bits
also depend on the CPU's float kernels (torch build, instruction set): ``pinned/PROVENANCE`` records the ones it
was produced with; elsewhere the comparison falls back to 1e-5 relative and warns.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl

# The public entry point, kept in this one import so the source-layout refactor has one line to update.
from kotune.cli import main as kotune_main

PINNED = Path(__file__).parent / "pinned" / "metrics.jsonl"
PINNED_PACKED = Path(__file__).parent / "pinned" / "metrics-packed.jsonl"
"""The same run with ``train.packing: on``: each step's rows end to end in one sequence (kotune's packing path)."""
PROVENANCE = Path(__file__).parent / "pinned" / "PROVENANCE"
"""The torch build and CPU instruction set the pinned bytes were produced with."""


def provenance() -> str:
    """The torch build, the instruction set torch dispatches to, and the CPU model with its AVX-512 / AMX
    extensions: two AMD EPYC machines both reporting ``AVX512`` summed one gradient in another order."""
    cpu = {"model name": "unknown", "flags": ""}
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        key, _, value = line.partition(":")
        if key.strip() in cpu and cpu[key.strip()] in ("unknown", ""):
            cpu[key.strip()] = value.strip()
    extensions = " ".join(sorted(f for f in cpu["flags"].split() if f.startswith(("avx512", "amx"))))
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, cpu {capability}, {cpu['model name']} ({extensions or 'no AVX-512'})\n"


ROWS = [
    {
        "instruction": f"Add {i} and {i + 1}.",
        "input": "" if i % 3 else "numbers",
        "output": f"{i} + {i + 1} = {2 * i + 1}.",
    }
    for i in range(10)
]

SETTINGS = {
    "model.quantization": "none",
    "model.compute_dtype": "float32",
    "model.gradient_checkpointing": False,
    "data.template": "alpaca",
    "data.val_size": 0.2,
    "data.cutoff_len": 256,
    "data.seed": 3,
    "lora.r": 4,
    "lora.alpha": 8,
    "lora.dropout": 0.1,
    "train.seed": 7,
    "train.max_steps": 4,
    "train.micro_batch_size": 2,
    "train.gradient_accumulation_steps": 2,
    "train.learning_rate": 0.01,
    "train.warmup_steps": 1,
    "train.optimizer": "adamw_torch",
    "train.eval_steps": 2,
    "train.eval_at_start": True,
    "train.save_steps": 2,
    "train.min_free_disk_gb": 0,
}


def write_config(folder: Path, model_dir: str, **more) -> Path:
    """The pinned settings as a YAML config (with its rows written beside it), as a user would pass them."""
    data = write_jsonl(folder / "rows.jsonl", ROWS)
    extra = {"model.path": model_dir, "data.path": str(data), "train.output_dir": str(folder / "run")}
    sections: dict[str, dict] = {}
    for key, value in {**SETTINGS, **extra, **more}.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    config = folder / "pinned.yaml"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return config


def kotune_train(config: Path, *args: str) -> None:
    """``kotune train CONFIG ARGS`` in this process with the clock held still and one CPU thread."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOTUNE_CACHE", str(config.parent / "cache"))
        mp.setattr(time, "perf_counter", lambda: 1000.0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the sums of a matrix product must not depend on the machine's core count
        try:
            assert kotune_main(["train", str(config), *args]) == 0
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, bytes]:
    """The config and the metrics.jsonl bytes of one pinned run (its folder is then the resume test's to break)."""
    config = write_config(tmp_path_factory.mktemp("pinned"), tiny_model_dir)
    kotune_train(config)
    return config, (config.parent / "run" / "metrics.jsonl").read_bytes()


def assert_pinned(produced: bytes, pinned_file: Path = PINNED) -> None:
    """Byte for byte where the torch build and CPU match the pin's; elsewhere (another instruction set sums floats
    in another order) every field equal and every float within 1e-5 relative, with a warning saying so."""
    expected = pinned_file.read_bytes()
    if os.environ.get("KOTUNE_REPIN") == "1":
        PROVENANCE.write_text(provenance(), encoding="utf-8")
    elif PROVENANCE.read_text(encoding="utf-8") != provenance() and produced != expected:
        was, now = PROVENANCE.read_text(encoding="utf-8").strip(), provenance().strip()
        warnings.warn(f"pinned with {was}, running {now}: metrics compared to 1e-5, not byte for byte", stacklevel=2)
        pinned = [json.loads(line) for line in expected.decode("utf-8").splitlines()]
        records = [json.loads(line) for line in produced.decode("utf-8").splitlines()]
        assert [sorted(r) for r in records] == [sorted(r) for r in pinned]
        for a, b in zip(records, pinned, strict=True):
            assert a == pytest.approx(b, rel=1e-5), (a, b)
        return
    if produced != expected:
        pinned = [json.loads(line) for line in expected.decode("utf-8").splitlines()]
        now = [json.loads(line) for line in produced.decode("utf-8").splitlines()]
        diff = [(a, b) for a, b in zip(pinned, now, strict=False) if a != b]
        raise AssertionError(
            f"metrics.jsonl differs from {pinned_file} (first differing records, pinned vs now: {diff[:2]}; "
            f"{len(pinned)} vs {len(now)} records). If the maths changed on purpose, repin: "
            "KOTUNE_REPIN=1 python -m pytest -q tests/unit/test_pinned_run.py"
        )


@pytest.mark.compat("torch", "peft", "safetensors", "pyyaml", "tqdm")
def test_tiny_run_writes_the_pinned_metrics(pinned_run):
    _, produced = pinned_run
    if os.environ.get("KOTUNE_REPIN") == "1":
        PINNED.write_bytes(produced)
        print(f"repinned {PINNED}: commit it with the reason the numbers changed")
    records = [json.loads(line) for line in produced.decode("utf-8").splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    # the run itself, before any comparison: 4 finite steps, evaluations at 0, 2 and 4, and training that moved
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # every logged step states input tokens/s (what other tools report) beside trained tokens/s
    assert all({"tokens_per_s", "input_tokens_per_s"} <= r.keys() for r in records if "loss" in r)
    assert sorted(evals) == [0, 2, 4] and all(math.isfinite(v) for v in [*losses, *evals.values()])
    assert evals[4] < evals[0], "four steps at lr 1e-2 should lower the validation loss"
    assert_pinned(produced)


def test_a_finished_run_records_its_base(pinned_run, tiny_model_dir):
    """What ``model.adapter`` checks a later run's base against (``model.lora.check_adapter_base``)."""
    from kotune.hashing import model_identity

    config, _ = pinned_run
    summary = json.loads((config.parent / "run" / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["base"] == model_identity(tiny_model_dir)


def test_packed_run_writes_its_pinned_metrics_and_trains_the_same_steps(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, **{"train.packing": "on"})
    kotune_train(config)
    produced = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    if os.environ.get("KOTUNE_REPIN") == "1":
        PINNED_PACKED.write_bytes(produced)
    packed = [json.loads(line) for line in produced.decode("utf-8").splitlines()]
    padded = [json.loads(line) for line in PINNED.read_text(encoding="utf-8").splitlines()]
    # Packing changes how a step's rows are fed, not which rows or how many tokens a step has. LoRA dropout draws
    # its masks in the batch's shape, so gradients differ from the padded run's; the losses of steps 1 and 2 do
    # not (LoRA B starts at zero and step 1's learning rate is 0 in the warm-up), nor does the first evaluation.
    assert [sorted(r) for r in packed] == [sorted(r) for r in padded]
    for a, b in zip(packed, padded, strict=True):
        same = ("step", "tokens", "input_tokens", "lr", "epoch", "skipped")
        assert {k: a.get(k) for k in same} == {k: b.get(k) for k in same}
    assert packed[0] == padded[0]  # the evaluation before step 1
    assert [r["loss"] for r in packed[1:3]] == pytest.approx([r["loss"] for r in padded[1:3]], rel=1e-6)
    assert_pinned(produced, PINNED_PACKED)


def test_a_run_resumed_past_a_broken_checkpoint_writes_the_same_metrics_and_adapter(pinned_run, capsys):
    """Crash after step 4's checkpoint was half written: resuming skips it and the partial folder, goes back to
    checkpoint-2 and replays steps 3 and 4 into the very same metrics.jsonl and adapter."""
    config, _ = pinned_run
    run = config.parent / "run"
    adapter = (run / "adapter_model.safetensors").read_bytes()
    (run / "run_summary.json").unlink()  # the run did not finish
    torn = run / "checkpoint-4" / "optimizer.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    (run / ".tmp-checkpoint-6").mkdir()  # what a kill during a save leaves
    capsys.readouterr()
    kotune_train(config, "--resume")
    said = capsys.readouterr()
    skipped = [line for line in (said.out + said.err).splitlines() if "skipping" in line]
    assert len(skipped) == 1 and str(run / "checkpoint-4") in skipped[0] and "checksum" in skipped[0], skipped
    assert not (run / ".tmp-checkpoint-6").exists()
    assert_pinned((run / "metrics.jsonl").read_bytes())
    assert (run / "adapter_model.safetensors").read_bytes() == adapter

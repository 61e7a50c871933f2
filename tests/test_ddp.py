"""Several processes (torchrun, gloo on the CPU): the same steps, the same losses and adapter as one process,
resumable on another number of processes, and stopping together on a signal or a non-finite loss.

LoRA dropout is off here: with it, a row trained by another process draws other random numbers, so one and two
processes could not be compared exactly. Everything else is the training code as users run it, through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TRAIN_ROWS, build_tiny_model, write_jsonl
from safetensors.torch import load_file

from kotune.training.checkpoint import list_checkpoints, verify

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores


def command(args: list[str], processes: int) -> list[str]:
    """``kotune ARGS`` in one process, or under torchrun in ``processes``."""
    if processes == 1:
        return [sys.executable, "-m", "kotune.cli", *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [sys.executable, *launcher, "-m", "kotune.cli", *args]


def kotune(args: list[str], processes: int, log: Path, timeout: int = 600) -> int:
    """Run to the end with stdout and stderr in ``log``; returns the exit code."""
    with log.open("w") as sink:
        return subprocess.run(
            command(args, processes), env=ENV, cwd=ROOT, stdout=sink, stderr=sink, timeout=timeout
        ).returncode


def losses(run: Path) -> dict[tuple[str, int], float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("loss", "eval_loss"):
            if key in record:
                out[key, record["step"]] = record[key]
    return out


def assert_same_run(a: Path, b: Path, tolerance: float = 1e-5, atol: float = 1e-7) -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert lb[key] == pytest.approx(la[key], rel=tolerance), key
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=tolerance, atol=atol)


@pytest.fixture(scope="module")
def ddp_config(tmp_path_factory, tiny_train_config):
    """Four steps of 2 x 2 rows, eval and checkpoint every 2 steps, dropout off."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = tiny_train_config(
        root / "unused",
        {
            "lora.dropout": 0.0,
            "train.max_steps": 4,
            "train.micro_batch_size": 2,
            "train.gradient_accumulation_steps": 2,
            "train.eval_steps": 2,
            "train.save_steps": 2,
        },
    )
    path = root / "config.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_and_two(ddp_config, tmp_path_factory):
    """The same config trained by one process and by two (run folders and the two-process log)."""
    root = tmp_path_factory.mktemp("ddp-runs")
    runs = {}
    for n in (1, 2):
        out, log = root / f"p{n}", root / f"p{n}.log"
        code = kotune(["train", str(ddp_config), f"train.output_dir={out}"], n, log)
        assert code == 0, log.read_text()[-4000:]
        runs[n] = out
    return runs[1], runs[2], root / "p2.log"


def test_two_processes_train_the_same_steps_as_one(one_and_two):
    one, two, log = one_and_two
    assert_same_run(one, two)
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["processes"] == 2 and len(r["input_tokens_per_process"]) == 2 for r in steps)
    assert all(min(r["input_tokens_per_process"]) > 0 for r in steps)
    text = log.read_text()
    assert text.count("trainable params:") == 1 and text.count("kotune: data (alpaca)") == 1  # said once


def test_two_processes_train_the_same_full_packing_steps_as_one(tiny_train_config, tmp_path):
    """``packing: full``: each step's packed sequences are split over the processes, whole, so two processes train
    the steps one does (cutoff 256: several rows a sequence, two sequences a step, one per process)."""
    overrides = {"lora.dropout": 0.0, "train.packing": "full", "data.cutoff_len": 256, "train.max_steps": 3}
    overrides |= {"train.micro_batch_size": 1, "train.gradient_accumulation_steps": 2, "train.save_steps": 3}
    two, log = one_and_two_processes(tiny_train_config, tmp_path, overrides)
    steps = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(len(r["input_tokens_per_process"]) == 2 and min(r["input_tokens_per_process"]) > 0 for r in steps)
    assert "steps (packing full)" in log.read_text()


def one_and_two_processes(tiny_train_config, tmp_path: Path, overrides: dict) -> tuple[Path, Path]:
    """The tiny run with ``overrides`` trained by one process and by two (torchrun, gloo), checked to be the same
    run; (the two-process run's folder, its log)."""
    path = tmp_path / "config.yaml"
    path.write_text(tiny_train_config(tmp_path / "unused", overrides).to_yaml(), encoding="utf-8")
    runs = {}
    for n in (1, 2):
        runs[n], log = tmp_path / f"p{n}", tmp_path / f"p{n}.log"
        assert kotune(["train", str(path), f"train.output_dir={runs[n]}"], n, log) == 0, log.read_text()[-4000:]
    assert_same_run(runs[1], runs[2])
    return runs[2], log


def test_a_two_process_checkpoint_resumes_on_one_process(one_and_two, ddp_config, tmp_path):
    one, two, _ = one_and_two
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(two / "checkpoint-2", out / "checkpoint-2")
    log = tmp_path / "resume.log"
    assert (
        kotune(["train", str(ddp_config), f"train.output_dir={out}", "--resume", str(out / "checkpoint-2")], 1, log)
        == 0
    )
    later = {k: v for k, v in losses(one).items() if k[1] > 2}
    resumed = losses(out)
    for key, value in later.items():
        assert resumed[key] == pytest.approx(value, rel=1e-5), key


def test_sigterm_to_one_process_stops_both_with_one_checkpoint(ddp_config, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = ["train", str(ddp_config), f"train.output_dir={out}", "train.max_steps=200", "train.save_steps=1000"]
    with log.open("w") as sink:
        launcher = subprocess.Popen(command(args, 2), env=ENV, cwd=ROOT, stdout=sink, stderr=sink)
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGTERM)
        assert launcher.wait(timeout=300) != 0
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1, checkpoints
    verify(checkpoints[0])
    text = log.read_text()
    assert text.count("to continue, run:") == 1
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped < 200


def test_a_non_finite_loss_on_one_process_stops_both_at_the_same_step(tmp_path, llama3_dir, tiny_train_config):
    """One row holds tokens whose embeddings are NaN; the process that draws it reports NaN, and both stop."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    poison = tokenizer.encode(" kotune_poison_row", add_special_tokens=False)
    rows = [dict(r) for r in TINY_TRAIN_ROWS]
    rows[3]["output"] = "kotune_poison_row"
    clean = {t for r in rows[:3] + rows[4:] for f in r.values() for t in tokenizer.encode(f, add_special_tokens=False)}
    poison = [t for t in poison if t not in clean]
    assert poison
    model = build_tiny_model(tmp_path / "model", llama3_dir)
    weights = load_file(Path(model) / "model.safetensors")
    weights["model.embed_tokens.weight"][poison] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, Path(model) / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = tiny_train_config(
        tmp_path / "run",
        {
            "model.path": model,
            "data.path": str(data),
            "data.val_size": 0,
            "data.cache": False,
            "lora.dropout": 0.0,
            "train.max_steps": 12,
            "train.micro_batch_size": 2,
            "train.max_bad_steps": 1,
            "train.save_steps": 1000,
        },
    )
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml(), encoding="utf-8")
    log = tmp_path / "run.log"
    assert kotune(["train", str(config)], 2, log) != 0
    text = log.read_text()
    stops = [line for line in text.splitlines() if "consecutive steps with a non-finite loss" in line]
    assert len(stops) == 2, text[-4000:]  # each process names the step it stopped at: the same one
    assert len({line.split("the last at step ")[1].split(" ")[0] for line in stops}) == 1


def test_the_multi_host_command_runs_as_two_launchers_on_one_host(one_and_two, ddp_config, tmp_path):
    """README's multi-host command, one process per "host": two torchrun launchers meet at a c10d rendezvous."""
    import socket

    _, two, _ = one_and_two
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    launch = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--rdzv-id=kotune-test"]
    args = ["-m", "kotune.cli", "train", str(ddp_config), f"train.output_dir={out}"]
    logs = [tmp_path / f"host{i}.log" for i in range(2)]
    sinks = [log.open("w") for log in logs]
    try:
        hosts = [subprocess.Popen([*launch, *args], env=ENV, cwd=ROOT, stdout=f, stderr=f) for f in sinks]
        codes = [host.wait(timeout=600) for host in hosts]
    finally:
        for f in sinks:
            f.close()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert_same_run(two, out)


def test_a_step_with_fewer_rows_than_processes_is_a_config_error(tiny_train_config, tmp_path):
    from kotune.config import ConfigError
    from kotune.data.order import total_steps

    cfg = tiny_train_config(tmp_path, {"train.micro_batch_size": 1, "train.gradient_accumulation_steps": 1})
    assert total_steps(cfg, [5] * 19, 1)[0] == 6
    with pytest.raises(ConfigError, match="cannot be split over 2 processes"):
        total_steps(cfg, [5] * 19, 2)


def test_two_processes_train_the_same_dpo_steps_as_one(tiny_train_config, tmp_path):
    """A DPO run (a step's pairs split over the processes by tokens, every second held-out pair each): the same
    losses, preference metrics and adapter on one process and on two."""
    from test_pref_train import PAIRS, _preference_overrides

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    overrides = {"train.max_steps": 2, "train.eval_steps": 2, "train.micro_batch_size": 1}
    cfg = tiny_train_config(tmp_path / "unused", _preference_overrides(pairs, "dpo", **overrides))
    config = tmp_path / "dpo.yaml"
    config.write_text(cfg.to_yaml(), encoding="utf-8")
    runs = []
    for n in (1, 2):
        out, log = tmp_path / f"p{n}", tmp_path / f"p{n}.log"
        assert kotune(["train", str(config), f"train.output_dir={out}"], n, log) == 0, log.read_text()[-4000:]
        runs.append([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    one, two = runs
    assert all(r.pop("processes") == 2 for r in two if "loss" in r)
    assert all(sum(r.pop("input_tokens_per_process")) == r["input_tokens"] for r in two if "loss" in r)
    assert [sorted(r) for r in one] == [sorted(r) for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "reward_margin", "logps_chosen", "logps_rejected", "eval_loss", "eval_reward_margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    wa, wb = (load_file(tmp_path / f"p{n}" / "adapter_model.safetensors") for n in (1, 2))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-7)

"""Interrupt-and-resume: a run killed anywhere and resumed matches an uninterrupted one; changed inputs are refused.

The kill is an exception raised from a global forward pre-hook (``torch.nn.modules.module.
register_module_forward_pre_hook``, a public PyTorch API) at the N-th training forward, so the real
``kotune.training.recipe.train`` runs unchanged and nothing after the kill point is executed, as with ``kill -9``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_ROWS, write_jsonl
from safetensors.torch import load_file

from kotune.training.checkpoint import CheckpointError, latest_good
from kotune.training.fingerprint import FingerprintMismatch
from kotune.training.recipe import train
from kotune.training.signals import Interrupted


class SimulatedKill(Exception):
    """Stands for ``kill -9``: raised inside a forward, so no code of the run runs after it."""


class AtForward:
    """Call ``action()`` at the ``n``-th training-mode forward (one per micro-batch) of the LoRA model."""

    def __init__(self, n: int, action):
        self.n, self.action, self.seen = n, action, 0

    def __enter__(self):
        from peft import PeftModel

        from kotune.fast.decoder import FastCausalLM

        def hook(module, args):
            # the module the loop calls: the LoRA model, or its fast-path wrapper on CUDA; never evaluation
            if isinstance(module, PeftModel | FastCausalLM) and module.training and torch.is_grad_enabled():
                self.seen += 1
                if self.seen == self.n:
                    self.action()

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def kill_at_forward(n: int) -> AtForward:
    def kill():
        raise SimulatedKill(f"killed at training forward {n}")

    return AtForward(n, kill)


def records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def by_step(output_dir: Path, key: str) -> dict[int, float]:
    """``step -> value`` of one metric, failing if a step was logged twice."""
    found = [(r["step"], r[key]) for r in records(output_dir) if key in r]
    steps = [s for s, _ in found]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {steps}"
    return dict(found)


def assert_close_rel(got: dict[int, float], want: dict[int, float], rel: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-6, atol=1e-9, msg=name)


def assert_same_run(run: Path, reference: Path) -> None:
    """Same per-step losses and eval losses (1e-6 relative), same final and best adapters, same counters."""
    assert_close_rel(by_step(run, "loss"), by_step(reference, "loss"))
    assert_close_rel(by_step(run, "eval_loss"), by_step(reference, "eval_loss"))
    assert_same_adapter(run / "adapter_model.safetensors", reference / "adapter_model.safetensors")
    assert_same_adapter(run / "best" / "adapter_model.safetensors", reference / "best" / "adapter_model.safetensors")
    summary = json.loads((run / "run_summary.json").read_text())
    expected = json.loads((reference / "run_summary.json").read_text())
    for key in ("steps", "tokens", "skipped_steps", "best_step", "best_eval_loss"):
        assert summary[key] == expected[key], key


@pytest.fixture(scope="module")
def reference(tiny_train_config, tmp_path_factory) -> Path:
    """An uninterrupted six-step run (checkpoints at steps 2 and 4, evals at 3 and 6)."""
    out = tmp_path_factory.mktemp("reference")
    train(tiny_train_config(out))
    assert sorted(by_step(out, "loss")) == [1, 2, 3, 4, 5, 6]
    return out


# (training forward to kill at, checkpoint the resume must start from). Two micro-batches per step:
# forward 5 starts step 3 right after checkpoint-2; forward 8 is mid-window of step 4, after step 3 and its
# eval were logged (so the log must be trimmed and best/ rolled back); forward 10 is mid-window of step 5.
KILLS = [(5, 2), (8, 2), (10, 4)]


@pytest.mark.slow
@pytest.mark.parametrize(("forward", "checkpoint"), KILLS, ids=[f"forward{f}" for f, _ in KILLS])
def test_killed_run_resumes_to_the_same_losses_and_adapter(tiny_train_config, reference, tmp_path, forward, checkpoint):
    out = tmp_path / "run"
    cfg = tiny_train_config(out)
    with pytest.raises(SimulatedKill), kill_at_forward(forward):
        train(cfg)
    assert latest_good(out).name == f"checkpoint-{checkpoint}"
    steps_logged_before = max(r["step"] for r in records(out))
    assert steps_logged_before == (forward - 1) // 2
    train(cfg, resume="auto")
    assert_same_run(out, reference)


def test_sigint_mid_window_saves_that_step_and_resumes_to_the_same_run(tiny_train_config, reference, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_train_config(out)
    with pytest.raises(Interrupted) as stopped, AtForward(5, lambda: os.kill(os.getpid(), signal.SIGINT)):
        train(cfg)
    # forward 5 opens step 3: the step is finished, then saved off the save_steps cadence; its evaluation is
    # skipped (a stop waits for one step, no more) and runs first on resume
    assert (stopped.value.step, stopped.value.exit_code) == (3, 130)
    assert stopped.value.checkpoint == out / "checkpoint-3" and latest_good(out) == out / "checkpoint-3"
    assert 3 in by_step(out, "loss") and 3 not in by_step(out, "eval_loss")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    train(cfg, resume="auto")
    assert_same_run(out, reference)


@pytest.mark.slow
def test_killed_4bit_run_resumes_to_the_same_losses_and_adapter(tiny_train_config, tmp_path):
    overrides = {"model.quantization": "4bit"}
    reference_dir = tmp_path / "reference"
    train(tiny_train_config(reference_dir, overrides))
    out = tmp_path / "run"
    cfg = tiny_train_config(out, overrides)
    with pytest.raises(SimulatedKill), kill_at_forward(8):
        train(cfg)
    train(cfg, resume="auto")
    assert_same_run(out, reference_dir)


FOUR_BIT = {"model.quantization": "4bit"}


@pytest.mark.slow
def test_an_evaluation_does_not_change_4bit_training(tiny_train_config, tmp_path):
    # On AVX512-BF16 CPUs bitsandbytes rewrote the 4-bit weights at the first evaluation (see
    # kotune.model.load.keep_4bit_weights_exact): step 4's loss moved by 2e-6 relative after an eval at step 3.
    with_eval = train(tiny_train_config(tmp_path / "eval3", FOUR_BIT))  # evaluations at steps 3 and 6
    without = train(tiny_train_config(tmp_path / "eval6", {**FOUR_BIT, "train.eval_steps": 6}))  # step 6 only
    assert_close_rel(by_step(with_eval, "loss"), by_step(without, "loss"), rel=0)
    assert_same_adapter(
        with_eval / "checkpoint-6" / "adapter_model.safetensors", without / "checkpoint-6" / "adapter_model.safetensors"
    )


KILL_AT_FORWARD = """
import os, sys
import torch
from peft import PeftModel
from kotune.cli import main

seen = [0]

def kill(module, args):
    if isinstance(module, PeftModel) and module.training and torch.is_grad_enabled():
        seen[0] += 1
        if seen[0] == int(sys.argv[2]):
            os._exit(137)  # as kill -9: nothing of the run executes after this point

torch.nn.modules.module.register_module_forward_pre_hook(kill)
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_4bit_run_killed_after_an_evaluation_resumes_in_a_new_process_to_the_same_run(tiny_train_config, tmp_path):
    import subprocess
    import sys

    from conftest import run_kotune

    configs = {}
    for name in ("reference", "run"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(tiny_train_config(tmp_path / name, FOUR_BIT).to_yaml(), encoding="utf-8")
    done = run_kotune(["train", str(configs["reference"])])
    assert done.returncode == 0, done.stderr[-3000:]
    # forward 9 opens step 5: after the evaluation at step 3 and checkpoint-4
    killed = subprocess.run([sys.executable, "-c", KILL_AT_FORWARD, str(configs["run"]), "9"], capture_output=True)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert latest_good(tmp_path / "run") == tmp_path / "run" / "checkpoint-4"
    assert 3 in by_step(tmp_path / "run", "eval_loss")
    resumed = run_kotune(["train", str(configs["run"]), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_run(tmp_path / "run", tmp_path / "reference")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_killed_bf16_gpu_run_resumes_to_the_same_losses_and_adapter(tiny_train_config, tmp_path):
    # bf16 on CUDA takes the fast path (train.kernels auto); CUDA's RNG state is saved and restored too.
    overrides = {"model.compute_dtype": "bfloat16"}
    reference_dir = tmp_path / "reference"
    train(tiny_train_config(reference_dir, overrides))
    out = tmp_path / "run"
    cfg = tiny_train_config(out, overrides)
    with pytest.raises(SimulatedKill), kill_at_forward(8):
        train(cfg)
    train(cfg, resume="auto")
    assert_same_run(out, reference_dir)


def test_resume_auto_without_checkpoints_starts_from_step_zero(tiny_train_config, reference, tmp_path, capsys):
    out = tmp_path / "fresh"
    train(tiny_train_config(out), resume="auto")
    assert "no checkpoint" in capsys.readouterr().out
    assert_same_run(out, reference)


@pytest.fixture
def finished_copy(reference, tmp_path) -> Path:
    """A copy of the reference run without its final checkpoint (as if killed after checkpoint-4 was written), so a
    resume replays steps 5 and 6; a copy, so a resume attempt cannot disturb the shared run."""
    copy = Path(shutil.copytree(reference, tmp_path / "copy"))
    shutil.rmtree(copy / "checkpoint-6")
    return copy


def test_resume_with_changed_dataset_is_refused_then_forced(tiny_train_config, finished_copy, tmp_path, capsys):
    rows = [dict(r) for r in TINY_TRAIN_ROWS]
    rows[3]["output"] = "다른 답변입니다."
    (tmp_path / "changed").mkdir()
    changed = write_jsonl(tmp_path / "changed" / "train.jsonl", rows)  # same file name, other content
    cfg = tiny_train_config(finished_copy, {"data.path": str(changed)})
    before = (finished_copy / "metrics.jsonl").read_bytes()
    with pytest.raises(FingerprintMismatch) as refused:
        train(cfg, resume="auto")
    message = str(refused.value)
    assert "checkpoint-4" in message and "data file train:train.jsonl: content changed" in message
    assert "--force" in message
    assert (finished_copy / "metrics.jsonl").read_bytes() == before, "a refused resume must not touch the run"

    train(cfg, resume="auto", force=True)
    assert "kotune: warning: resuming from" in capsys.readouterr().err  # a warning: stderr, like every warning
    assert sorted(by_step(finished_copy, "loss")) == [1, 2, 3, 4, 5, 6]


def test_resume_with_changed_training_config_names_the_key(tiny_train_config, finished_copy):
    cfg = tiny_train_config(finished_copy, {"train.learning_rate": 5e-4, "lora.dropout": 0.2})
    with pytest.raises(FingerprintMismatch) as refused:
        train(cfg, resume="auto")
    assert "config train.learning_rate: 0.001 -> 0.0005" in str(refused.value)
    assert "config lora.dropout: 0.1 -> 0.2" in str(refused.value)


def test_resume_may_change_bookkeeping_settings(tiny_train_config, finished_copy, reference):
    # The evaluation cadence does not change the weights (and evaluation draws no random numbers), so it is
    # not fingerprinted and the resumed steps match the reference.
    train(tiny_train_config(finished_copy, {"train.eval_steps": 1}), resume="auto")
    assert_close_rel(by_step(finished_copy, "loss"), by_step(reference, "loss"))
    assert sorted(by_step(finished_copy, "eval_loss")) == [3, 5, 6]


def test_every_key_a_resume_may_change_is_a_real_config_key():
    from kotune.config import all_keys
    from kotune.training.fingerprint import NOT_FINGERPRINTED

    assert sorted(NOT_FINGERPRINTED - set(all_keys())) == []


@pytest.fixture
def finished(reference, tmp_path) -> Path:
    """A copy of the finished reference run (its final checkpoint included)."""
    return Path(shutil.copytree(reference, tmp_path / "finished"))


def test_a_finished_run_ends_in_a_checkpoint_and_resuming_it_changes_nothing(tiny_train_config, finished, capsys):
    assert latest_good(finished) == finished / "checkpoint-6"
    kept = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    train(tiny_train_config(finished), resume="auto")
    out = capsys.readouterr().out
    assert f"{finished} is a finished run (6 steps, adapter written); nothing to do" in out
    assert "trainable params" not in out, "the model must not load"
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file() and p.name != ".kotune-lock"} == {
        p: b for p, b in kept.items() if p.name != ".kotune-lock"
    }


def test_a_finished_run_is_extended_to_a_new_end(tiny_train_config, finished, reference, capsys):
    train(tiny_train_config(finished, {"train.max_steps": 8}), resume="auto")
    captured = capsys.readouterr()
    assert "the run's end moved (config train.max_steps: 6 -> 8); the learning-rate schedule is recomputed" in (
        captured.out
    )
    assert f"resumed from {finished / 'checkpoint-6'} at step 6 (of 8)" in captured.err
    losses, expected = by_step(finished, "loss"), by_step(reference, "loss")
    assert sorted(losses) == list(range(1, 9))
    assert_close_rel({s: losses[s] for s in expected}, expected, rel=0)
    assert latest_good(finished) == finished / "checkpoint-8"
    assert json.loads((finished / "run_summary.json").read_text())["steps"] == 8
    with pytest.raises(CheckpointError, match="is at step 8, past this config's end \\(step 6\\)"):
        train(tiny_train_config(finished), resume="auto")


def test_a_run_whose_final_adapter_write_failed_writes_it_on_resume(tiny_train_config, finished, reference):
    # what a full disk at the final write leaves: the final checkpoint, no adapter and no summary
    (finished / "adapter_model.safetensors").unlink()
    (finished / "run_summary.json").unlink()
    train(tiny_train_config(finished), resume="auto")
    assert_same_run(finished, reference)

"""Edges of the command line that used to end in a traceback: Ctrl-C outside training, and ``train.output_dir=.``
over a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from kotune.cli import main


def test_ctrl_c_outside_training_is_one_line_and_exit_130(monkeypatch, capsys):
    import kotune.commands.report as report

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted)
    assert main(["report", "somewhere"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "kotune: error: report interrupted (Ctrl-C)" and "Traceback" not in err


def test_the_current_folder_as_output_dir_over_a_run_is_refused_by_name(tmp_path, monkeypatch):
    from kotune.training.claim import RunFolderError, take_over

    run = tmp_path / "my-run"
    (run / "checkpoint-2").mkdir(parents=True)
    monkeypatch.chdir(run)
    with pytest.raises(RunFolderError, match=r"moves the old run to my-run\.replaced-1/"):
        take_over(Path("."), resume=False, overwrite=False)
    aside = take_over(Path("."), resume=False, overwrite=True)
    assert aside == tmp_path / "my-run.replaced-1" and (aside / "checkpoint-2").is_dir()


def test_pairs_read_as_sft_rows_name_train_objective_and_eval_is_not_told_of_data_columns():
    from kotune.data.formats import detect_format
    from kotune.data.read import DataError

    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match="preference pairs .*train.objective=dpo, orpo, simpo or kto, not sft"):
        detect_format(pairs, "pairs.jsonl")
    with pytest.raises(DataError) as unknown:
        detect_format([{"question": "q"}], "rows.jsonl", "give `kotune eval` rows of one of those formats with --data")
    assert "data.columns" not in str(unknown.value) and "--data" in str(unknown.value)


@pytest.mark.parametrize(
    ("env", "launcher"),
    [
        ({}, "kotune train run.yaml lora.r=8 --resume"),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "torchrun --nproc_per_node=2 -m kotune.cli train run.yaml"),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "torchrun --nproc_per_node=2 --nnodes=2 -m kotune.cli train"),
    ],
)
def test_the_resume_command_of_a_stopped_run_keeps_its_launcher(monkeypatch, env, launcher):
    from types import SimpleNamespace

    from kotune.commands.train import resume_command

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = resume_command(SimpleNamespace(config="run.yaml", overrides=["lora.r=8"]))
    assert command.startswith(launcher) and "lora.r=8 --resume" in command
    assert command.endswith("rendezvous options)") == (env.get("WORLD_SIZE") == "4")


def test_under_torchrun_a_refusal_is_said_once_and_a_process_own_error_by_each(monkeypatch, capsys):
    import kotune.commands.report as report
    from kotune.config import ConfigError
    from kotune.training.checkpoint import CheckpointError

    for error, said_by_second in ((ConfigError("'lora.r' must be positive"), False), (CheckpointError("x"), True)):
        monkeypatch.setattr(report, "run", lambda args, e=error: (_ for _ in ()).throw(e))
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            assert main(["report", "somewhere"]) == 2
            said = capsys.readouterr().err.startswith("kotune: error:")
            assert said == (rank == "0" or said_by_second), (type(error).__name__, rank)


def test_an_error_line_is_one_write_with_its_newline(monkeypatch):
    """Under torchrun every process writes its own error line to the same log: written as text then newline
    (print's two writes), two processes' lines ran together on one line (CI, 2026-12-06)."""
    import io
    import sys

    from kotune import output

    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return len(s)

    monkeypatch.setattr(sys, "stderr", Recorder())
    output.error("the step went wrong")
    assert writes == ["kotune: error: the step went wrong\n"]

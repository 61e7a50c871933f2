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

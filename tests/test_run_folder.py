"""The run folder has one owner: a new run never lands on an old one, two processes never train into one folder,
and what cannot be a run folder (a file, a read-only place) is refused before anything loads."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kotune.cli import main
from kotune.config import ConfigError
from kotune.run_folder import LOCK
from kotune.training.claim import RunFolderError, claim

# Printed by kotune.training.build.load_for_training: seeing it means the model was loaded.
MODEL_LOADED = "trainable params:"


def config_file(tiny_train_config, tmp_path: Path, out: Path, overrides: dict | None = None) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(tiny_train_config(out, overrides).to_yaml(), encoding="utf-8")
    return path


@pytest.mark.parametrize("left", ["metrics.jsonl", "kotune_config.yaml", "adapter_model.safetensors", "checkpoint-2"])
def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tiny_train_config, tmp_path, capsys, left):
    out = tmp_path / "run"
    out.mkdir()
    (out / left).mkdir() if left.startswith("checkpoint") else (out / left).write_text("{}\n")
    assert main(["train", str(config_file(tiny_train_config, tmp_path, out))]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"kotune: error: train.output_dir {out} already holds a run ({left})")
    assert "--resume" in captured.err and "--overwrite" in captured.err and "run.replaced-1" in captured.err
    assert MODEL_LOADED not in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted([left, LOCK])


def test_overwrite_moves_the_old_run_aside_and_trains(tiny_train_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "checkpoint-2").mkdir()
    (out / "notes.txt").write_text("mine")
    config = config_file(tiny_train_config, tmp_path, out, {"train.max_steps": 2})
    assert main(["train", str(config), "--overwrite"]) == 0
    aside = tmp_path / "run.replaced-1"
    assert f"moved the earlier run in {out} to {aside}" in capsys.readouterr().out
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert (aside / "checkpoint-2").is_dir() and (aside / "notes.txt").read_text() == "mine"
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2" / "COMPLETE").is_file()
    assert main(["train", str(config), "--overwrite", "--resume"]) == 2
    assert "pick one" in capsys.readouterr().err


def test_a_folder_with_only_foreign_files_is_used(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with claim(out, resume=False, overwrite=False) as aside:
        assert aside is None


HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from kotune.training.claim import claim\n"
    "with claim(Path(sys.argv[1]), resume=False, overwrite=False):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def test_a_second_launch_into_a_folder_in_use_names_the_other_process(tiny_train_config, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        config = config_file(tiny_train_config, tmp_path, out)
        assert main(["train", str(config), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"kotune: error: train.output_dir {out} is in use by pid {holder.pid} on ")
        # the lock dies with its process, kill -9 included: the folder is free again
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with claim(out, resume=True, overwrite=False):
            assert f"pid {os.getpid()} " in (out / LOCK).read_text()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_an_output_path_that_is_a_file_is_refused(tiny_train_config, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a folder")
    assert main(["train", str(config_file(tiny_train_config, tmp_path, out))]) == 2
    expected = f"kotune: error: train.output_dir {out} is a file, not a folder; choose another path\n"
    assert capsys.readouterr().err == expected


def test_an_output_folder_that_cannot_be_written_is_refused(tiny_train_config, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    # root writes through permissions; sysfs refuses even root
    out = Path("/sys/kotune-run") if os.geteuid() == 0 else parent / "run"
    try:
        assert main(["train", str(config_file(tiny_train_config, tmp_path, out))]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"kotune: error: train.output_dir {out} cannot be created") and "another path" in err
    finally:
        parent.chmod(0o700)


def parsed(*argv: str) -> argparse.Namespace:
    from kotune.cli import build_parser
    from kotune.commands.train import config_and_resume

    args = build_parser().parse_args(["train", *argv])
    config_and_resume(args)
    return args


def test_resume_before_the_config_takes_it_as_the_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_steps: 2\n")
    args = parsed("--resume", str(config), "train.seed=3")
    assert (args.config, args.resume, args.overrides) == (str(config), "auto", ["train.seed=3"])
    args = parsed(str(config), "--resume", str(tmp_path / "checkpoint-4"))
    assert (args.config, args.resume) == (str(config), str(tmp_path / "checkpoint-4"))
    args = parsed(str(config), "--resume", "train.max_steps=20")
    assert (args.config, args.resume, args.overrides) == (str(config), "auto", ["train.max_steps=20"])
    with pytest.raises(ConfigError, match="two configs given"):
        parsed("--resume", str(config), str(config))
    with pytest.raises(ConfigError, match="no config given"):
        parsed("--resume")


def test_resume_before_the_config_runs_with_that_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_steps: 2\n")
    assert main(["train", "--resume", str(config), "--dry-run"]) == 0
    assert "max_steps: 2" in capsys.readouterr().out
    # extending a finished run: `--resume train.max_steps=N` is an override, not a checkpoint
    assert main(["train", str(config), "--resume", "train.max_steps=20", "train.seed=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 20" in out and "seed: 3" in out


def test_resume_from_a_missing_checkpoint_names_it(tiny_train_config, tmp_path, capsys):
    out = tmp_path / "run"
    missing = out / "checkpoint-7"
    assert main(["train", str(config_file(tiny_train_config, tmp_path, out)), "--resume", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"kotune: error: --resume {missing}: no such checkpoint folder")
    assert "older kotune" not in captured.err and MODEL_LOADED not in captured.out


def test_run_folder_errors_are_user_errors():
    from kotune.errors import KotuneError

    assert issubclass(RunFolderError, KotuneError)


CLAIM_ON_RANK = (
    "import sys\n"
    "from pathlib import Path\n"
    "import torch.distributed\n"
    "from kotune.training import dist\n"
    "from kotune.training.claim import RunFolderError, claim\n"
    "dist.init()\n"
    "try:\n"
    "    with claim(Path(sys.argv[1]), resume=False, overwrite=False):\n"
    "        print('claimed', flush=True)\n"
    "except RunFolderError as exc:\n"
    "    print('refused:', exc, flush=True)\n"
    "torch.distributed.destroy_process_group()\n"
)


def claim_on_two_ranks(out: Path) -> list[str]:
    """What each of two gloo processes (as torchrun starts them) says when claiming ``out``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_ON_RANK, str(out)],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    said = [p.communicate(timeout=120)[0].strip() for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], said
    return said


def test_under_torchrun_rank_0_claims_for_all_and_a_refusal_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    assert claim_on_two_ranks(out) == ["claimed", "claimed"]
    assert (out / LOCK).is_file() and list(out.iterdir()) == [out / LOCK]
    (out / "metrics.jsonl").write_text("{}\n")
    rank0, rank1 = claim_on_two_ranks(out)
    assert rank0.startswith(f"refused: train.output_dir {out} already holds a run (metrics.jsonl)")
    assert rank1 == f"refused: train.output_dir {out}: the first process could not claim it"

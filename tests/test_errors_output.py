"""One error base that every user-facing error derives from, printed once by the CLI; one output channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from kotune import errors, output
from kotune.cli import main
from kotune.config import ConfigError
from kotune.data.read import DataError
from kotune.data.templates import TemplateError
from kotune.errors import KotuneError
from kotune.evaluation.harness import HarnessError
from kotune.export.gguf import ExportError
from kotune.export.merge import MergeError
from kotune.export.publish import PublishError
from kotune.model.assets import AssetError
from kotune.model.hub import HubModelError
from kotune.model.load import MissingWeights
from kotune.run_folder import FolderError
from kotune.security import SecurityError
from kotune.training.checkpoint import CheckpointError
from kotune.training.claim import RunFolderError
from kotune.training.fingerprint import FingerprintMismatch
from kotune.training.loop import NonFiniteLoss
from kotune.training.recipe import OutOfMemory

USER_ERRORS = (
    AssetError,
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    FingerprintMismatch,
    FolderError,
    HarnessError,
    HubModelError,
    MergeError,
    MissingWeights,
    NonFiniteLoss,
    OutOfMemory,
    PublishError,
    RunFolderError,
    SecurityError,
    TemplateError,
)


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: e.__name__)
def test_every_user_error_is_a_kotune_error(error):
    assert issubclass(error, KotuneError)


def test_the_error_base_collects_nothing():
    """Each module defines its own error; errors.py imports none of them."""
    assert "kotune" not in "".join(
        line for line in Path(errors.__file__).read_text(encoding="utf-8").splitlines() if "import" in line
    )


def test_the_cli_prints_a_kotune_error_as_one_line_with_its_exit_code(tmp_path, capsys):
    missing = tmp_path / "no-run"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"kotune: error: {missing}: no metrics.jsonl; give the output_dir of a `kotune train` run\n"


def test_quiet_drops_info_and_status_but_not_warnings(capsys):
    output.set_quiet(True)
    try:
        output.info("done")
        output.status("working")
        output.warn("careful")
    finally:
        output.set_quiet(False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "kotune: warning: careful\n"


def test_messages_print_on_the_first_process_only(monkeypatch, capsys):
    output.info("from rank 0")
    monkeypatch.setenv("RANK", "1")
    output.info("from rank 1")
    output.warn("from rank 1")
    assert capsys.readouterr() == ("from rank 0\n", "")

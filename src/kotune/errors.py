"""Errors a user can fix: the CLI prints their message (which names the file, row or key) without a traceback."""

from kotune.config import ConfigError
from kotune.data.read import DataError
from kotune.data.templates import TemplateError
from kotune.evaluation.harness import HarnessError
from kotune.export.merge import MergeError
from kotune.export.publish import PublishError
from kotune.model.assets import AssetError
from kotune.run_folder import FolderError
from kotune.training.checkpoint import CheckpointError
from kotune.training.claim import RunFolderError

USER_ERRORS = (
    AssetError,
    CheckpointError,
    ConfigError,
    DataError,
    FolderError,
    HarnessError,
    MergeError,
    PublishError,
    RunFolderError,
    TemplateError,
)

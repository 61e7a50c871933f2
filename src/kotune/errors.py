"""Errors a user can fix: the CLI prints their message (which names the file, row or key) without a traceback."""

from kotune.assets import AssetError
from kotune.checkpoint import CheckpointError
from kotune.claim import RunFolderError
from kotune.config import ConfigError
from kotune.data import DataError
from kotune.evaluation.harness import HarnessError
from kotune.inference import FolderError
from kotune.merge import MergeError
from kotune.publish import PublishError
from kotune.templates import TemplateError

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

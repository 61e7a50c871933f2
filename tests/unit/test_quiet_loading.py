"""Loading is quiet and log-friendly: transformers' ``torch_dtype`` notice is dropped (most hub checkpoints still
carry the old key), and when stderr is not a terminal (pytest captures it, as a scheduler log or nohup would) no
progress bar redraws into it: one ``kotune: loading`` line per phase, and a plain training line every 5% of the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kotune.config import ModelConfig
from kotune.model.load import TORCH_DTYPE_NOTICE, base_from_pretrained, quiet_transformers

pytestmark = pytest.mark.compat("transformers")


@pytest.fixture
def bars_restored():
    """Put transformers' progress-bar switch back as it was, so other tests see the default."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def old_key_folder(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with ``torch_dtype`` in its config.json instead of ``dtype``, as most hub checkpoints have."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("old-key") / "model"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = config.pop("dtype", "float32")
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_the_torch_dtype_notice_alone_is_dropped(bars_restored):
    import io
    import logging

    from transformers.utils import logging as hf_logging

    quiet_transformers()
    quiet_transformers()  # a second call adds no second filter
    # transformers' own stream handlers (pytest may have added a handler of its own that writes nowhere)
    handlers = [h for h in logging.getLogger("transformers").handlers if isinstance(h, logging.StreamHandler)]
    streams = [handler.setStream(io.StringIO()) for handler in handlers]  # read what transformers prints
    try:
        for name in ("transformers.configuration_utils", "transformers.modeling_utils", "transformers.other"):
            hf_logging.get_logger(name).warning(TORCH_DTYPE_NOTICE)
        hf_logging.get_logger("transformers.modeling_utils").warning("another warning stays")
        printed = "".join(handler.stream.getvalue() for handler in handlers)
    finally:
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)
    assert handlers and all(len(handler.filters) == 1 for handler in handlers)
    assert "torch_dtype" not in printed
    assert printed.count("another warning stays") == len(handlers)


def test_without_a_terminal_loading_writes_one_line_and_no_bar(old_key_folder, capfd, bars_restored):
    from transformers.utils import logging as hf_logging

    base_from_pretrained(str(old_key_folder), ModelConfig(quantization="none", compute_dtype="float32"))
    err = capfd.readouterr().err
    assert not hf_logging.is_progress_bar_enabled()
    assert "\r" not in err and "Loading weights" not in err, err
    assert "torch_dtype" not in err
    assert err.count("kotune: loading weights of") == 1


def test_without_a_terminal_training_progress_is_a_plain_line_every_5_percent(tmp_path, capfd):
    from kotune.config import Config
    from kotune.training.report import Reporter

    progress = Reporter(Config(), tmp_path, main_process=True).progress(total=40, done=10)  # resumed at step 10
    for step in range(11, 41):
        progress.set_postfix(loss=f"{1 / step:.4f}", tok_s=100)
        progress.update(1)
    progress.close()
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    expected = [f"train: step {s}/40 ({100 * s // 40}%)" for s in range(12, 41, 2)]  # every 2 steps: 5% of 40
    assert [line.split(",")[0] for line in lines] == expected
    assert lines[-1].startswith("train: step 40/40 (100%), loss=0.0250, tok_s=100, ") and lines[-1].endswith("left")

"""The lm-evaluation-harness bridge: lm-eval tasks run on the model kotune loaded (its ``HFLM`` wrapper accepts a
model object), so an adapter on its 4-bit base is evaluated exactly as ``kotune eval`` loads it.

lm-eval is an optional extra (``pip install 'kotune[eval]'``). Its tasks load their data from the hub; a task whose
data is not available (offline, or not cached) fails at once, before any model time is spent, naming what to fetch.
"""

from __future__ import annotations

from kotune.errors import KotuneError


class HarnessError(KotuneError, RuntimeError):
    """lm-eval is missing, a task is unknown, or a task's data cannot be loaded; the message says what to do."""


def require_lm_eval():
    try:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError(
            "--tasks needs lm-evaluation-harness, which is not installed: pip install 'kotune[eval]'"
        ) from None
    return HFLM, TaskManager


def load_tasks(names: list[str], include_path: str | None = None) -> dict:
    """lm-eval's task objects with their data loaded; unknown names and unavailable data stop here."""
    _, TaskManager = require_lm_eval()
    from lm_eval.tasks import get_task_dict

    manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise HarnessError(
            f"unknown lm-eval task(s): {', '.join(unknown)}; `lm_eval ls tasks` lists them, and --include-path adds "
            "a folder of your own task YAML files"
        )
    tasks = {}
    for name in names:
        try:
            tasks.update(get_task_dict([name], manager))
        except Exception as exc:  # datasets raises many types for a missing file, hub or connection
            raise HarnessError(
                f"lm-eval task {name}: its data could not be loaded ({type(exc).__name__}: {str(exc)[:300]}). "
                "lm-eval tasks read their data from the Hugging Face hub: run once with network access (unset "
                "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) to cache it, or point a task YAML at a local file and pass "
                "its folder with --include-path"
            ) from None
    return tasks


def run_tasks(model, tokenizer, tasks: dict, limit: int | None = None) -> dict:
    """Per task of ``load_tasks``, lm-eval's metrics (e.g. ``acc``, ``acc_norm``) for the model as loaded."""
    HFLM, _ = require_lm_eval()
    from lm_eval.evaluator import evaluate

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    results = evaluate(lm, tasks, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    return {
        task: {key.split(",")[0]: value for key, value in metrics.items() if isinstance(value, int | float)}
        for task, metrics in results["results"].items()
    }

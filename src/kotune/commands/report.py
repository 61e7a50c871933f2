"""``kotune report RUN_DIR``: write the run's ``report.md`` (curves, figures, audit, config, eval and merge)."""

from __future__ import annotations

from kotune import output


def register(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.md: curves, audit, config, eval and merge reports")
    p.add_argument("path", help="a training run's output folder")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from kotune.evaluation.run_report import write_run_report
    from kotune.run_folder import METRICS, FolderError

    if not (Path(args.path) / METRICS).is_file():
        raise FolderError(f"{args.path}: no {METRICS}; give the output_dir of a `kotune train` run")
    output.info(f"kotune: wrote {write_run_report(args.path)}")
    return 0

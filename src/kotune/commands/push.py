"""``kotune push RUN_DIR|MERGED_DIR --repo USER/NAME [--private] [--dry-run DIR]``"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("push", help="upload the adapter or merged model with a generated model card")
    p.add_argument("path", help="a training run's output folder (adapter) or a merged model folder")
    p.add_argument("--repo", required=True, help="hub repository, USER/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument(
        "--dry-run",
        metavar="DIR",
        default=None,
        help="write exactly what would be uploaded to DIR (new or empty) and upload nothing",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from kotune.export.publish import push

    push(args.path, args.repo, args.private, args.dry_run)
    return 0

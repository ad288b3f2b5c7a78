"""`lamflow download ID [--stage S] -o DIR`: the run report (default) or a stage's outputs."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("download", help="fetch a run's report, or one stage's models/reports")
    p.add_argument("id")
    p.add_argument("--stage", help="clean, pretrain, finetune, test, distill, compress or report (default)")
    p.add_argument("-o", "--output", type=Path, default=Path("results"), help="folder (default: results)")
    p.add_argument("--workdir", help="debug runs: the work directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...backends import find_run
    from ...results import download

    got = download(find_run(args.id, args.workdir), args.output, args.stage)
    for p in got:
        print(p)
    return 0

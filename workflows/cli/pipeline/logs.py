"""`lamflow logs ID STAGE`: the log of each step of a stage (or of one step key, e.g. test-1)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("logs", help="print the logs of a stage's steps")
    p.add_argument("id")
    p.add_argument("stage", help="stage name or step key (finetune, finetune-0, ...)")
    p.add_argument("--workdir", help="debug runs: the work directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...backends import find_run
    from ...results import logs

    for key, text in logs(find_run(args.id, args.workdir), args.stage):
        print(f"==> {key} <==")
        print(text.rstrip())
    return 0

"""`lamflow retry ID [--from STAGE]`: a new run of the same pipeline that reuses the outputs of
every step that succeeded, and reruns the failed ones (or STAGE and every later stage)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("retry", help="rerun failed stages (or --from STAGE on), reusing succeeded steps")
    p.add_argument("id")
    p.add_argument("--from", dest="from_stage", help="rerun this stage and every later one")
    p.add_argument("--workdir", help="debug runs: the work directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from .cmd_submit import report_debug
    from .engine import find_run, retry

    r = find_run(args.id, args.workdir)
    rid, status = retry(r, args.from_stage)
    if r.mode == "debug":
        return report_debug(rid, status, r.workdir)
    print(f"submitted {rid} (retry of {args.id})\n  lamflow watch {rid}")
    return 0

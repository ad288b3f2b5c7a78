"""`lamflow list`: debug runs in the work directory, and Argo runs when LAMFLOW_ARGO_HOST is set."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("list", help="list pipeline runs")
    p.add_argument("--workdir", help="debug runs: the work directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...backends import list_runs

    rows = list_runs(args.workdir)
    if not rows:
        print("no runs")
        return 0
    for r in rows:
        when = r["created"]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if isinstance(when, (int, float)) else (when or "")
        extra = f"  (retry of {r['parent']})" if r.get("parent") else ""
        print(f"{r['id']:<28} {r['mode']:<6} {str(r['status']):<10} {when}{extra}")
    return 0

"""`lamflow watch ID`: follow a run until it ends, printing each step as its phase changes."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("watch", help="follow a run until it finishes")
    p.add_argument("id")
    p.add_argument("--workdir", help="debug runs: the work directory")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...backends import find_run
    from ...runs import FINAL, run_status, steps_of
    from .status import headline

    r = find_run(args.id, args.workdir)
    seen: dict[str, str] = {}
    while True:
        for i in steps_of(r):
            if seen.get(i.key) != i.phase:
                seen[i.key] = i.phase
                print(f"{time.strftime('%H:%M:%S')}  {i.key:<14} {i.phase:<10} {headline(i.stage, i.summary)}".rstrip(),
                      flush=True)
        status = run_status(r)
        if status in FINAL:
            print(f"{r.id}: {status}")
            return 0 if status == "Succeeded" else 1
        time.sleep(args.interval)

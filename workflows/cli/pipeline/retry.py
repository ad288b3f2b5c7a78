"""`lamflow retry ID [--spec FIXED.yaml] [--from STAGE]`: a new run of the pipeline that reuses the
outputs of every step that succeeded with unchanged inputs, and reruns the rest. With --spec, the
fixed pipeline is validated and used: a changed setting reruns its step and every step after it
(step keys hold a hash of each step's inputs), nothing else. With --from, that stage and every
later one are rerun from scratch. A run whose every step succeeded has nothing to retry."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("retry", help="rerun failed or changed stages (or --from STAGE on), reusing succeeded steps")
    p.add_argument("id")
    p.add_argument("--spec", type=Path, help="the fixed pipeline YAML to use instead of the run's own")
    p.add_argument("--from", dest="from_stage", help="rerun this stage and every later one from scratch")
    p.add_argument("--workdir", help="debug runs: the work directory")
    p.add_argument("--skip-data-check", action="store_true", help="with --spec: do not read the datasets first")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...backends import find_run
    from ...retry import retry
    from ...spec import SpecError, check_spec, load_spec
    from .submit import report_debug

    spec = load_spec(args.spec) if args.spec else None
    if spec is not None:  # a bad fixed spec fails before the run is looked up (data are checked by retry)
        problems = check_spec(spec, data=False)
        if problems:
            raise SpecError(problems)
    r = find_run(args.id, args.workdir)
    rid, status = retry(r, args.from_stage, spec=spec, check_data=not args.skip_data_check)
    if rid is None:
        return 0
    if status is not None:  # the backend ran it here (debug): its outcome
        return report_debug(rid, status, r.workdir)
    print(f"submitted {rid} (retry of {args.id})\n  lamflow watch {rid}")
    return 0

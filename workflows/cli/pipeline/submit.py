"""`lamflow submit PIPELINE.yaml [--debug]`: run the pipeline, locally in dflow's debug mode
(per-stage progress, exit 1 if the run failed) or on Argo (prints the workflow id)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("submit", help="run a pipeline: on Argo, or locally with --debug")
    p.add_argument("pipeline", type=Path, help="pipeline YAML")
    p.add_argument("--debug", action="store_true", help="run locally in dflow's debug mode (no server, no Docker)")
    p.add_argument("--workdir", help="debug mode: where runs go (default: the spec's debug.workdir, lamflow-runs)")
    p.add_argument("--skip-data-check", action="store_true", help="do not read the datasets before submitting")
    p.add_argument("--container", choices=["docker"], help="debug mode: run every step in the step image, "
                   "through dflow's ContainerExecutor, with no network (see deploy/README.md)")
    p.add_argument("--container-image", help="with --container: the image (default $LAMFLOW_CONTAINER_IMAGE, "
                   "else lamflow:VERSION-local-cpu from deploy/images/build-local.sh)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...backends import ARGO, DEBUG
    from ...dflow_config import workdir_of
    from ...spec import load_spec

    container = containers_of(args)
    spec = load_spec(args.pipeline)
    if args.debug:
        workdir = workdir_of(spec, args.workdir)
        rid, status = DEBUG.submit(spec, workdir=workdir, check_data=not args.skip_data_check, container=container)
        return report_debug(rid, status, workdir)
    rid, _ = ARGO.submit(spec, check_data=not args.skip_data_check)
    print(f"submitted {rid}\n  lamflow watch {rid}\n  lamflow download {rid} -o results/")
    return 0


def containers_of(args):
    """--container / --container-image -> a containers.Container (debug mode only), or None."""
    from ...containers import Container, ContainerError

    if args.container_image and not args.container:
        raise ContainerError("--container-image needs --container docker")
    if not args.container:
        return None
    if not args.debug:
        raise ContainerError("--container runs the steps locally: it needs --debug (on Argo every step is a pod "
                             "of its stage's image already)")
    return Container(args.container, args.container_image or "")


def report_debug(rid: str, status: str, workdir: Path) -> int:
    from ...backends import find_run
    from .status import print_status

    print()
    print_status(find_run(rid, workdir))
    run = find_run(rid, workdir)
    print(f"\nrun {rid}: {status}; outputs in {workdir / rid}")
    for key, f in ((run.meta or {}).get("failures") or {}).items():
        print(f"  {key} failed: {f['error']}\n    full log: {f['log']}")
    if status != "Succeeded":
        print(f"  lamflow logs {rid} STAGE --workdir {workdir}    # what went wrong")
        print(f"  lamflow retry {rid} --workdir {workdir}         # rerun the failed stages, reuse the rest")
        return 1
    print(f"  lamflow download {rid} -o results/ --workdir {workdir}")
    return 0

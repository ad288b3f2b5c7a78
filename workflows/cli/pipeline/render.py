"""`lamflow render PIPELINE.yaml [-o wf.yaml]`: the Argo Workflow manifest, offline."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("render", help="write the Argo Workflow manifest of a pipeline (no server needed)")
    p.add_argument("pipeline", type=Path, help="pipeline YAML")
    p.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    p.add_argument("--namespace", help="metadata.namespace (default: LAMFLOW_NAMESPACE or engine.namespace)")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from ...render import render_manifest
    from ...spec import SpecError, check_spec, image_problems, load_spec

    if args.output is not None and not args.output.parent.is_dir():  # before any work, so nothing is left behind
        raise SpecError(f"-o {args.output}: folder {args.output.parent} does not exist")
    spec = load_spec(args.pipeline)
    problems = check_spec(spec, data=False, models=False) + image_problems(spec)  # `lamflow validate` checks the rest
    if problems:
        raise SpecError(problems)
    text = yaml.safe_dump(render_manifest(spec, namespace=args.namespace), sort_keys=False, width=120)
    if args.output:
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(text)
        tmp.replace(args.output)  # atomic: a reader never sees half a manifest
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

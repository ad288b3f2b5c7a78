"""`lamflow validate PIPELINE.yaml`: every problem of the spec and the data it names, one line
each with the YAML path; exit 1 if there is any. Nothing is submitted."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a pipeline YAML and its data; one line per problem")
    p.add_argument("pipeline", type=Path, help="pipeline YAML")
    p.add_argument("--no-data", action="store_true", help="check the spec only, do not read the datasets")
    p.add_argument("--argo", action="store_true", help="also check what Argo needs (pinned images for every stage)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...spec import SpecError, check_spec, image_problems, load_spec, resolved_type_map

    try:
        spec = load_spec(args.pipeline)
        problems = check_spec(spec, data=not args.no_data)
        if args.argo:
            problems += image_problems(spec)
    except SpecError as e:
        problems = e.problems
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{args.pipeline}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    from ...spec import as_list, is_s3

    remote = sorted({n for n, d in spec.datasets.items() for sp in ("train", "valid", "test")
                     for p in as_list(getattr(d, sp)) if is_s3(p)})
    if remote and not args.no_data:
        print(f"note: datasets on S3 ({', '.join(remote)}) were not read; lamflow submit fetches and checks them")
    if not args.no_data:  # fine-tuning onto elements the pretrained checkpoint lacks, where it can add them
        from ...spec import finetune_coverage, spec_elements

        for line in finetune_coverage(spec, spec_elements(spec)):
            print(f"note: {line}")
    tm = resolved_type_map(spec)
    print(f"{args.pipeline}: ok — stages {', '.join(spec.stages.enabled())}; datasets {', '.join(spec.used_datasets())}; "
          f"type map {tm}")
    return 0

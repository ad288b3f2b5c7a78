"""`lamflow clean SYSTEM... -o OUT [--config CLEAN.yaml] [--pretrained CKPT]`: drop frames with
broken labels or geometry (OUT/data, deepmd/npy), report every dropped frame and why
(OUT/clean.json, clean.png, report.md), the pretrained model's element coverage and zero-shot
errors, and with an `active` section, an active-learning selection (OUT/active)."""

from __future__ import annotations

from pathlib import Path

OVERRIDES = ("max_force", "energy_outlier_z", "duplicate_tol", "min_distance")


def register(sub) -> None:
    p = sub.add_parser("clean", help="clean labelled data; coverage and zero-shot errors of a pretrained model")
    p.add_argument("system", nargs="+", help="systems (folders or files in any dpdata format)")
    p.add_argument("-o", "--output", type=Path, default=Path("clean_out"), help="output folder (default: clean_out)")
    p.add_argument("-c", "--config", type=Path, help="YAML/JSON with the clean settings (max_force, energy_outlier_z, "
                   "duplicate_tol, min_distance, zero_shot, active)")
    p.add_argument("--pretrained", help="checkpoint whose element coverage and zero-shot errors to report")
    p.add_argument("--branch", help="head of a multi-task checkpoint")
    p.add_argument("--type-map", nargs="+", help="element order of the output (default: as found in the data)")
    p.add_argument("--fmt", default="auto", help="dpdata format (default: detect deepmd/npy, deepmd/raw)")
    p.add_argument("--no-zero-shot", action="store_true", help="report coverage only, do not evaluate the pretrained model")
    for key in OVERRIDES:
        p.add_argument(f"--{key.replace('_', '-')}", type=float, help=f"override the config's {key}")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.errors import DataError
    from lamflow.model.schema import parse_config
    from lamflow.model.tasks.clean import CleanConfig, clean
    from lamflow.model.training.config import read_yaml

    for s in args.system:  # before reading any config or data
        if not Path(s).exists():
            raise DataError(f"{s}: no such file or directory")
    raw = read_yaml(args.config) if args.config else {}
    raw = dict(raw) if isinstance(raw, dict) else raw
    if isinstance(raw, dict):
        raw.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
        if args.no_zero_shot:
            raw["zero_shot"] = False
    cfg = parse_config(CleanConfig, raw, str(args.config or "command line"))
    res = clean(args.system, args.output, cfg, type_map=args.type_map, pretrained=args.pretrained, branch=args.branch,
                fmt=args.fmt)
    for r in res.report["systems"]:
        print(f"  {r['name']}: kept {r['kept']} of {r['nframes']}")
    print(f"kept {res.kept}, dropped {res.dropped}; wrote {res.out_dir / 'data'}, {res.report_json} and "
          f"{res.out_dir / 'report.md'}")
    return 0

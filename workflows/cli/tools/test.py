"""`lamflow test -m MODEL -s SYSTEM [...] [-o OUT] [--zero-shot PRETRAINED] [--branch HEAD]`: energy
per atom / force / virial errors per system and overall (metrics.json), parity plots, a bar chart
across systems and report.md; with --zero-shot, the pretrained model's errors after an
energy-bias refit on each system, side by side. `--branch` picks the energy head of a multi-task
model (the pretrained model of a pipeline, or MODEL itself)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("test", help="errors of a model on labelled systems (JSON, parity plots, report.md)")
    p.add_argument("-m", "--model", required=True, help="model checkpoint")
    p.add_argument("-s", "--system", nargs="+", required=True, help="systems (folders or files in any dpdata format)")
    p.add_argument("--fmt", default="auto", help="dpdata format (default: detect deepmd/npy, deepmd/raw)")
    p.add_argument("-o", "--output", type=Path, default=Path("test_out"), help="folder for metrics.json, plots and report.md")
    p.add_argument("--zero-shot", metavar="PRETRAINED", help="also test this pretrained checkpoint after an energy-bias "
                   "refit on each system, and compare")
    p.add_argument("--branch", default=None, help="energy head of a multi-task model given as -m or --zero-shot "
                   "(needed when it has more than one)")
    p.add_argument("--label", default=None, help="name of the model in plots and the report (default: file name)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.errors import ConfigError, DataError
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.tasks.evaluate import transferability
    from lamflow.model.tasks.report import short_names

    for s in args.system:
        if not Path(s).exists():
            raise DataError(f"{s}: no such file or directory")
    model = load_model(args.model, args.device)
    pre = load_model(args.zero_shot, args.device) if args.zero_shot else None
    if args.branch is not None and all(m.kind != "multitask" for m in (model, pre) if m is not None):
        raise ConfigError(f"--branch {args.branch}: neither -m nor --zero-shot is a multi-task model")
    model = _energy_head(model, args.branch, args.model)
    pre = None if pre is None else _energy_head(pre, args.branch, args.zero_shot)
    label = args.label or Path(args.model).stem
    res = transferability(model, args.system, args.output, fmt=args.fmt, zero_shot=pre, label=label, log=lambda *a: None)
    zs = res.zero_shot or {"systems": {}, "overall": {}}
    head = ("system", "frames", "E rmse meV/atom", "F rmse meV/A", "V rmse meV/atom")
    if pre is not None:
        head += ("E zero-shot", "F zero-shot")
    names = short_names(list(res.metrics["systems"]))
    rows = [head]
    for name, m in list(res.metrics["systems"].items()) + [("overall", res.metrics["overall"])]:
        row = (names.get(name, name), str(m["nframes"]), _meV(m.get("rmse_e_per_atom")), _meV(m.get("rmse_f")),
               _meV(m.get("rmse_v_per_atom")))
        if pre is not None:
            z = zs["overall"] if name == "overall" else zs["systems"].get(name, {})
            row += (_meV(z.get("rmse_e_per_atom")), _meV(z.get("rmse_f")))
        rows.append(row)
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    print(f"wrote {args.output / 'metrics.json'}, {args.output / 'parity.png'} and {res.report}")
    return 0


def _energy_head(model, branch: str | None, source: str):
    """A multi-task model's energy branch `branch` (None: its only one) as an energy model; others as they are."""
    from lamflow.model.errors import ConfigError

    if model.kind != "multitask":
        return model
    try:
        return model.branch_model(branch).eval()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" + (" with --branch" if branch is None else "")) from None


def _meV(v) -> str:
    return "-" if v is None else f"{1000 * v:.2f}"

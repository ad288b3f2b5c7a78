"""`lamflow test -m MODEL -s SYSTEM [...] [-o OUT]`: energy per atom / force / virial errors."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("test", help="errors of a model on labelled systems (JSON + parity PNG)")
    p.add_argument("-m", "--model", required=True, help="model checkpoint")
    p.add_argument("-s", "--system", nargs="+", required=True, help="systems (folders or files in any dpdata format)")
    p.add_argument("--fmt", default="auto", help="dpdata format (default: detect deepmd/npy, deepmd/raw)")
    p.add_argument("-o", "--output", type=Path, default=Path("test_out"), help="folder for metrics.json and parity.png")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.checkpoint import load_model
    from lamflow.model.evaluate import evaluate_paths

    model = load_model(args.model, args.device)
    res = evaluate_paths(model, args.system, fmt=args.fmt, out_dir=args.output)
    rows = [("system", "frames", "E rmse meV/atom", "F rmse meV/A", "V rmse meV/atom")]
    for name, m in list(res["systems"].items()) + [("overall", res["overall"])]:
        rows.append((name, str(m["nframes"]), _meV(m.get("rmse_e_per_atom")), _meV(m.get("rmse_f")), _meV(m.get("rmse_v_per_atom"))))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    print(f"wrote {args.output / 'metrics.json'} and {args.output / 'parity.png'}")
    return 0


def _meV(v) -> str:
    return "-" if v is None else f"{1000 * v:.2f}"

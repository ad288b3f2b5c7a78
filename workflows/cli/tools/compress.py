"""`lamflow compress -i MODEL -o OUT [-s STRIDE] [-e EXTRAPOLATE] [-f CHECK_FREQUENCY]
[-t TRAINING_DATA_OR_CONFIG] [--min-nbor-dist D]`: tabulate an se_e2_a model's embedding nets
(names as deepmd-kit's `dp compress`)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress an se_e2_a model: embedding nets -> quintic polynomial tables")
    p.add_argument("-i", "--input", required=True, help="se_e2_a model checkpoint")
    p.add_argument("-o", "--output", type=Path, default=Path("compressed.ckpt"),
                   help="compressed checkpoint (default compressed.ckpt)")
    p.add_argument("-s", "--step", "--stride", dest="stride", type=float, default=0.01,
                   help="stride of the first table (the second uses 10x); default 0.01")
    p.add_argument("-e", "--extrapolate", type=float, default=5.0,
                   help="the second table reaches extrapolate x upper (default 5)")
    p.add_argument("-f", "--frequency", dest="check_frequency", type=int, default=-1,
                   help="warn about inputs outside the tables every N evaluations (-1: never)")
    p.add_argument("-t", "--training-data", nargs="+", default=None,
                   help="training systems, or a training config (its training_data): min_nbor_dist is computed from them")
    p.add_argument("--min-nbor-dist", type=float, default=None, help="Angstrom; overrides data and checkpoint")
    p.add_argument("--fmt", default="auto", help="dpdata format of the training systems")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.tasks.compress import compress

    res = compress(args.input, args.output, stride=args.stride, extrapolate=args.extrapolate,
                   check_frequency=args.check_frequency, training_data=args.training_data,
                   min_nbor_dist=args.min_nbor_dist, fmt=args.fmt)
    print(f"wrote {res.checkpoint} ({res.tables} tables, {res.rows} rows, {res.seconds:.1f} s)")
    return 0

"""`lamflow export-deepmd MODEL -o model.pt [--branch B] [--report FILE]`: write a lamflow energy model
(single- or multi-task; a compressed one as the model it was compressed from) as a deepmd-kit 3.x
PyTorch checkpoint, plus a model card (`model.md` beside it) with the commands to freeze,
compress and run it in LAMMPS."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export-deepmd", help="write a lamflow model as a deepmd-kit checkpoint (+ model card)")
    p.add_argument("checkpoint", type=Path, help="lamflow checkpoint (or a folder holding model.ckpt)")
    p.add_argument("-o", "--output", type=Path, required=True, help="deepmd-kit checkpoint to write (model.pt)")
    p.add_argument("--branch", help="one energy branch of a multi-task model, exported as a single-task checkpoint")
    p.add_argument("--report", type=Path, help="metrics JSON to quote in the card (lamflow test's metrics.json or "
                                              "train.json; default: train.json beside the checkpoint)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.io.deepmd_export import export_deepmd
    from lamflow.model.io.model_card import write_card
    from lamflow.ops.artifacts import model_file

    src = model_file(args.checkpoint)
    out, info = export_deepmd(src, args.output, args.branch)
    card = write_card(out, src, info, args.report)
    print(f"wrote {out} (deepmd-kit checkpoint, branches {', '.join(info['branches'])}) and {card}")
    return 0

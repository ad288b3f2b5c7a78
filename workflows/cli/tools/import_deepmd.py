"""`lamflow import-deepmd MODEL.pt -o OURS.pt [--branch NAME]`: convert a deepmd-kit 3.x PyTorch
training checkpoint (se_e2_a, se_atten / DPA-1, se_atten_v2, single- or multi-task) into a lamflow
checkpoint with identical predictions. `--list-branches` prints a checkpoint's branches.
(Other commands, e.g. `lamflow train --finetune`, accept the deepmd-kit file directly.)"""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("import-deepmd", help="convert a deepmd-kit PyTorch checkpoint (model.ckpt.pt) to lamflow")
    p.add_argument("checkpoint", type=Path, help="deepmd-kit training checkpoint (model.ckpt.pt / model.pt)")
    p.add_argument("-o", "--output", type=Path, help="lamflow checkpoint to write")
    p.add_argument("--branch", help="branch (model_dict key) of a multi-task checkpoint")
    p.add_argument("--list-branches", action="store_true", help="print the checkpoint's branches and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.errors import CheckpointError
    from lamflow.model.io.deepmd_import import branches, import_deepmd, read_deepmd

    if args.list_branches:
        print("\n".join(branches(read_deepmd(args.checkpoint))))
        return 0
    if args.output is None:
        raise CheckpointError("import-deepmd: -o/--output is required")
    out = import_deepmd(args.checkpoint, args.output, args.branch)
    print(f"wrote {out}")
    return 0

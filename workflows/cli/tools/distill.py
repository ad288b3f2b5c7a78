"""`lamflow distill -t TEACHER -s SYSTEM... [-c CONFIG] [-o OUT] [--dft-train ...] [--dft-valid ...]`:
teacher MD exploration, teacher labelling with a trust check, se_e2_a student training, report."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher model into a small se_e2_a student (explore, label, train, report)")
    p.add_argument("-t", "--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--branch", default=None, help="head of a multi-task teacher")
    p.add_argument("-s", "--systems", nargs="+", required=True, help="training structures to explore from (any dpdata format)")
    p.add_argument("-c", "--config", type=Path, default=None, help="distillation config (YAML/JSON; DistillConfig keys)")
    p.add_argument("-o", "--output", type=Path, default=Path("distill_out"), help="output folder (default distill_out)")
    p.add_argument("--dft-train", nargs="+", default=None, help="DFT-labelled systems added to the student's training data")
    p.add_argument("--dft-valid", nargs="+", default=None, help="DFT-labelled systems for the student-vs-DFT report")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.tasks.distill import DistillConfig, distill, load_distill_config

    cfg = load_distill_config(args.config) if args.config else DistillConfig()
    res = distill(args.teacher, args.systems, cfg, args.output, dft_train=args.dft_train, dft_valid=args.dft_valid,
                  teacher_branch=args.branch, device=args.device)
    c = res.metrics["counts"]
    print(f"student: {res.student_checkpoint}  ({c['train_frames']} train / {c['test_frames']} held-out frames; "
          f"report {res.report_json})")
    return 0

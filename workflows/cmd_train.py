"""`lamflow train CONFIG.yaml [-o OUT] [--restart CKPT]` (fine-tuning options are added by the
multi-task module when present)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML/JSON config (deepmd-kit keys)")
    p.add_argument("config", type=Path, help="training config (YAML, or a deepmd-kit input.json)")
    p.add_argument("-o", "--output", type=Path, default=Path("train_out"), help="output folder (default: train_out)")
    p.add_argument("--restart", help="continue from a checkpoint with training state ('auto': OUTPUT/model.ckpt if present)")
    p.add_argument("--finetune", help="start from a pretrained checkpoint (lamflow or deepmd-kit .pt)")
    p.add_argument("--branch", "--model-branch", dest="branch", help="head of a multi-task checkpoint to start from, or RANDOM")
    p.add_argument("--freeze-descriptor", action="store_true", help="fine-tune the fitting only")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.config import load_train_config
    from lamflow.model.errors import ConfigError
    from lamflow.model.train import train

    cfg = load_train_config(args.config)
    if args.finetune:
        try:
            from lamflow.model.finetune import finetune
        except ImportError:
            raise ConfigError("--finetune: fine-tuning is not available in this build") from None
        res = finetune(cfg, args.finetune, args.output, branch=args.branch, freeze_descriptor=args.freeze_descriptor,
                       restart=args.restart)
    else:
        res = train(cfg, args.output, restart=args.restart)
    m = res.metrics
    print(f"model: {res.checkpoint}  (valid: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith("rmse")) + ")")
    return 0

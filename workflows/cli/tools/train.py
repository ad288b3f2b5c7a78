"""`lamflow train CONFIG.yaml [-o OUT] [--restart CKPT] [--finetune CKPT [--branch B] [--freeze-descriptor]]`.

A config whose model section has a `model_dict` (deepmd-kit's multi-task input) trains a
multi-task model (lamflow.model.training.multitask); run it under `torchrun --nproc_per_node N -m
lamflow.workflows.cli train ...` for data-parallel training (lamflow.model.training.distributed)."""

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
    from lamflow.model.errors import ConfigError
    from lamflow.model.training.config import load_train_config, read_yaml
    from lamflow.model.training.multitask_config import is_multitask_config
    from lamflow.model.training.trainer import train

    if is_multitask_config(read_yaml(args.config)):
        return _run_multitask(args)
    cfg = load_train_config(args.config)
    if args.finetune:
        try:
            from lamflow.model.training.finetune import finetune
        except ImportError:
            raise ConfigError("--finetune: fine-tuning is not available in this build") from None
        res = finetune(cfg, args.finetune, args.output, branch=args.branch, freeze_descriptor=args.freeze_descriptor,
                       restart=args.restart)
    else:
        res = train(cfg, args.output, restart=args.restart)
    if _rank() != 0:  # under torchrun only rank 0 reports
        return 0
    m = res.metrics
    print(f"model: {res.checkpoint}  (valid: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith("rmse")) + ")")
    return 0


def _run_multitask(args) -> int:
    from lamflow.model.errors import ConfigError
    from lamflow.model.training.multitask import train_multitask
    from lamflow.model.training.multitask_config import load_multitask_config

    if args.finetune or args.branch or args.freeze_descriptor:
        raise ConfigError(f"{args.config}: --finetune/--branch/--freeze-descriptor take a single-task config "
                          "(model.type_map, model.descriptor, model.fitting_net), not a multi-task one")
    res = train_multitask(load_multitask_config(args.config), args.output, restart=args.restart)
    if _rank() != 0:
        return 0
    for name, m in res.metrics.get("branches", {}).items():
        print(f"branch {name} (valid): " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith(("rmse", "ce", "acc"))))
    print(f"model: {res.checkpoint}  (multi-task: {', '.join(res.metrics.get('branches', {}))})")
    return 0


def _rank() -> int:
    from lamflow.model.training.distributed import world_from_env

    return world_from_env()[0]

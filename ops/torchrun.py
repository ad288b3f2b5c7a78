"""Training stages on several processes: the same training call, under `torchrun`.

A training OP with `nproc > 1` (resources.gpus: N) writes a job file and runs

    python -m torch.distributed.run --standalone --nproc_per_node N -m lamflow.ops.torchrun worker job.json

in its pod: N ranks (NCCL on GPUs, gloo on CPUs; lamflow.model.training.distributed joins the group)
train one model data-parallel; rank 0 writes the checkpoint and syncs it to the checkpoint
store. On several nodes (a Kubeflow TrainJob, resources.nodes: M) every node runs

    python -m lamflow.ops.torchrun node job.json

which fetches the step's inputs from the checkpoint store, restores the latest synced
checkpoint, and launches torchrun with no rendezvous flags: the Trainer's torch-distributed
runtime sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT / PET_NPROC_PER_NODE,
which torchrun reads as its defaults.

job.json: {"kind": "single" | "multitask" | "finetune", "config": {...}, "out": DIR,
           "finetune": {"pretrained", "branch", "freeze_descriptor"}, "store": StoreConfig param}

This module is the in-pod entry point (`worker`, `node`); the OP side that writes job.json and
starts torchrun is ops/training.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint_store import CheckpointStore, StoreConfig


def run_worker(job: dict) -> None:
    """One rank: the same call the one-process OP makes, plus the store hook on rank 0."""
    from lamflow.model.training.distributed import world_from_env

    rank = world_from_env()[0]
    store = StoreConfig.from_param(job.get("store"))
    hook = CheckpointStore(store).hook() if store is not None and rank == 0 else None
    out, cfg, kind = Path(job["out"]), job["config"], job["kind"]
    _train(kind, cfg, out, job, hook)
    if hook is not None:
        hook.wait()  # the last generation is in the store before rank 0 exits (a TrainJob's collect step reads it)


def _train(kind: str, cfg: dict, out: Path, job: dict, hook) -> None:
    if kind == "multitask":
        from lamflow.model.training.multitask import train_multitask
        from lamflow.model.training.multitask_config import parse_multitask_config

        train_multitask(parse_multitask_config(cfg, "job"), out, restart="auto", on_checkpoint=hook)
        return
    from lamflow.model.schema import parse_config
    from lamflow.model.training.config import TrainConfig

    tc = parse_config(TrainConfig, cfg, "job")
    if kind == "finetune":
        from lamflow.model.training.finetune import finetune

        ft = job["finetune"]
        finetune(tc, ft["pretrained"], out, branch=ft.get("branch") or None, freeze_descriptor=bool(ft.get("freeze_descriptor")),
                 restart="auto", on_checkpoint=hook)
    else:
        from lamflow.model.training.trainer import train

        train(tc, out, restart="auto", on_checkpoint=hook)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("worker", "node"):
        print("usage: python -m lamflow.ops.torchrun {worker|node} JOB.json", file=sys.stderr)
        return 2
    if argv[0] == "node":
        from .trainjob import run_node

        return run_node(Path(argv[1]))
    run_worker(json.loads(Path(argv[1]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running a training stage: in this process, or data-parallel under torchrun.

`run_training` is what the training OPs (pretrain, finetune) call: it parses the config (so a bad
one fails before any process starts), restores the latest synced checkpoint from the store, and
either trains here or writes job.json and starts

    python -m torch.distributed.run <launcher args> -m lamflow.ops.torchrun worker job.json

whose ranks make the same training call (ops/torchrun.py: the in-pod entry point).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import checkpoint_store
from .checkpoint_store import StoreConfig
from .common import write_json


def launcher_for(nproc: int) -> list[str] | None:
    """torchrun arguments for `nproc` processes in this pod (None: train in this process)."""
    if nproc and nproc > 1:
        return standalone(nproc)
    return None


def per_rank_threads(config: dict, nproc: int) -> dict:
    """Split training.num_threads between the ranks of one pod (each rank is its own process)."""
    tr = config.get("training") or {}
    n = tr.get("num_threads")
    if nproc > 1 and n:
        config = {**config, "training": {**tr, "num_threads": max(1, int(n) // nproc)}}
    return config


def run_training(kind: str, config: dict, work: Path, *, source: str, store=None, launcher: list[str] | None = None,
                 finetune: dict | None = None, log=print) -> dict:
    """One training run in `work` (kind "single", "multitask" or "finetune"), continuing from
    work/model.ckpt when it exists. `store` (a checkpoint_store.StoreConfig): the latest synced
    checkpoint is restored first and every save is synced. `launcher`: torchrun arguments, to
    train data-parallel in several processes (the config is checked here first, before any
    process starts). Returns the metrics of the trained model (train.json)."""
    from lamflow.model.schema import parse_config
    from lamflow.model.training.config import TrainConfig

    work = Path(work)
    if kind == "multitask":
        from lamflow.model.training.multitask_config import parse_multitask_config

        parsed = parse_multitask_config(config, source)
    else:
        parsed = parse_config(TrainConfig, config, source)
    hook = None
    if store is not None:
        cs = checkpoint_store.CheckpointStore(store, log=log)  # looked up when called (a test swaps the class)
        cs.restore(work)
        hook = cs.hook()
    if launcher is not None:
        nproc = next((int(a.split("=")[1]) for a in launcher if a.startswith("--nproc_per_node=")),
                     int(os.environ.get("PET_NPROC_PER_NODE", "1")) if os.environ.get("PET_NPROC_PER_NODE", "1").isdigit()
                     else 1)  # a TrainJob node: the runtime's value
        job = write_job(work / "job.json", kind, per_rank_threads(config, nproc), work, store=store, finetune=finetune)
        return launch(job, launcher, log=log)
    if kind == "multitask":
        from lamflow.model.training.multitask import train_multitask

        return synced(hook, train_multitask(parsed, work, restart="auto", log=log, on_checkpoint=hook).metrics)
    if kind == "finetune":
        from lamflow.model.training.finetune import finetune as run_ft

        ft = finetune or {}
        return synced(hook, run_ft(parsed, ft["pretrained"], work, branch=ft.get("branch") or None,
                                   freeze_descriptor=bool(ft.get("freeze_descriptor")), restart="auto", log=log,
                                   on_checkpoint=hook).metrics)
    from lamflow.model.training.trainer import train

    return synced(hook, train(parsed, work, restart="auto", log=log, on_checkpoint=hook).metrics)


def synced(hook, metrics: dict) -> dict:
    """`metrics`, once the background upload of the last checkpoint (checkpoint_store.AsyncSync)
    is done: a step hands on its outputs only with its final generation in the store."""
    if hook is not None:
        hook.wait()
    return metrics


# ----------------------------------------------------------------------------- torchrun


def torchrun_command(job: Path, launcher_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "lamflow.ops.torchrun", "worker", str(job)]


def standalone(nproc: int) -> list[str]:
    """One node, `nproc` processes (GPUs of the pod, or CPU processes)."""
    return ["--standalone", f"--nproc_per_node={nproc}"]


def write_job(path: Path, kind: str, config: dict, out: Path, *, store: StoreConfig | None = None,
              finetune: dict | None = None) -> Path:
    job = {"kind": kind, "config": config, "out": str(Path(out).resolve()), "finetune": finetune or {},
           "store": store.to_param() if store else {}}
    return write_json(Path(path), job)


def launch(job: Path, launcher_args: list[str], log=print, timeout: float | None = None) -> dict:
    """Run the job under torchrun; stream its output; return rank 0's train.json metrics. A rank
    that dies (lost peer, NCCL error, OOM) is a RuntimeError, i.e. a transient failure Argo may
    retry (the config was checked before launching)."""
    cmd = torchrun_command(job, launcher_args)
    log("launch: " + " ".join(cmd[1:]))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default; the config's num_threads sets torch's
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    for line in proc.stdout:
        log(line.rstrip())
        tail = (tail + [line.rstrip()])[-30:]
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        raise RuntimeError(f"torchrun exited with status {rc}: " + " | ".join(tail[-5:]))
    out = Path(json.loads(Path(job).read_text())["out"])
    metrics = out / "train.json"  # written by global rank 0: on the other nodes of a TrainJob there is none
    return json.loads(metrics.read_text()) if metrics.is_file() else {}

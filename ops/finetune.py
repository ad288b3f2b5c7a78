"""Finetune: one downstream system from the pretrained model (lamflow.model.training.finetune): the
pretrained descriptor, a kept head (branch NAME) or a new one (RANDOM, the default for a
multi-task model) with its energy bias re-fitted on the system, then training on its data. A
rerun of the step continues from its last checkpoint (`restart="auto"`; on Argo from the one
synced to the checkpoint store); `nproc > 1` trains data-parallel under torchrun."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import TRAINING_FILES, model_file
from .checkpoint_store import StoreConfig
from .common import (
    copy_outputs,
    dataset_fmt,
    pick_root,
    set_threads,
    split_paths,
    trace,
    train_config_dict,
    training_dir,
    user_errors_are_fatal,
    write_json,
)
from .training import launcher_for, run_training


def with_pretrained_model(config: dict, ckpt: Path) -> dict:
    """The fine-tune config must name a descriptor (deepmd-kit checks it; the weights come from the
    checkpoint): when the stage gives none, use the checkpoint's."""
    config = copy.deepcopy(config or {})
    model = config.setdefault("model", {})
    if "descriptor" not in model:
        from lamflow.model.io.checkpoint import read_checkpoint

        model["descriptor"] = read_checkpoint(ckpt)["config"]["descriptor"]
    return config


def run_finetune(config: dict, data: Path, system: str, pretrained: Path, out_dir: Path, *, type_map: list[str],
                 cleaned: Path | None = None, branch: str | None = None, freeze_descriptor: bool = False,
                 resume_dir: str | None = None, store: StoreConfig | None = None, launcher: list[str] | None = None,
                 threads: int = 0, log=print) -> dict:
    """Fine-tune on `system` (staged data); write model.ckpt, lcurve.csv/png, train.json and
    summary.json into out_dir; return the summary. `store`, `launcher`: as for run_pretrain."""
    out = Path(out_dir)
    work = training_dir(out, resume_dir)
    ckpt = model_file(pretrained)
    root = pick_root(system, data, cleaned)
    cfg = train_config_dict(with_pretrained_model(config, ckpt), type_map, split_paths(root, system, "train"),
                            split_paths(root, system, "valid"), dataset_fmt(root, system), threads)
    metrics = run_training("finetune", cfg, work, source=f"stages.finetune ({system})", store=store, launcher=launcher,
                           finetune={"pretrained": str(Path(ckpt).resolve()), "branch": branch or "",
                                     "freeze_descriptor": freeze_descriptor}, log=log)
    copy_outputs(work, out, TRAINING_FILES)
    keys = ("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom")
    summary = {"system": system, "metrics": {k: metrics[k] for k in keys if metrics.get(k) is not None},
               "steps": metrics.get("steps"), "train_wall_s": metrics.get("train_wall_s")}
    write_json(out / "summary.json", summary)
    return summary


def system_store(param: dict, system: str) -> StoreConfig | None:
    """The fan-out item's own checkpoint place: <prefix>/<run>/finetune/<system>."""
    store = StoreConfig.from_param(param)
    return store.child(system) if store is not None else None


class Finetune(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "config": Parameter(dict),                      # model/learning_rate/loss/training (deepmd-kit keys)
            "system": Parameter(str),                       # the downstream dataset
            "type_map": Parameter(List[str]),               # the pipeline's elements
            "branch": Parameter(str, default=""),           # multi-task head to keep, RANDOM for a new one ("": default)
            "freeze_descriptor": Parameter(bool, default=False),
            "resume_dir": Parameter(str, default=""),       # checkpoint folder that survives a failed step
            "checkpoint_store": Parameter(dict, default={}),  # S3 place the checkpoint is synced to ({}: none)
            "nproc": Parameter(int, default=1),             # processes (GPUs) of the pod: > 1 runs torchrun
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
            "data": Artifact(Path),                         # staged datasets
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
            "pretrained": Artifact(Path),                   # folder with the pretrained model.ckpt
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "model": Artifact(Path),                        # folder: model.ckpt, lcurve.csv/png, train.json, summary.json
            "summary": Parameter(dict),                     # validation RMSEs after fine-tuning
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("finetune", ip["system"])
        set_threads(ip["threads"])
        out = Path(f"finetune-{ip['system']}")
        with user_errors_are_fatal():
            summary = run_finetune(ip["config"], ip["data"], ip["system"], ip["pretrained"], out,
                                   type_map=list(ip["type_map"]), cleaned=ip["cleaned"], branch=ip["branch"] or None,
                                   freeze_descriptor=ip["freeze_descriptor"], resume_dir=ip["resume_dir"] or None,
                                   store=system_store(ip["checkpoint_store"], ip["system"]),
                                   launcher=launcher_for(ip["nproc"]), threads=ip["threads"])
        return OPIO({"model": out, "summary": json.loads(json.dumps(summary))})

"""Finetune: one downstream system from the pretrained model (lamflow.model.finetune): the
pretrained descriptor, a kept head (branch NAME) or a new one (RANDOM, the default for a
multi-task model) with its energy bias re-fitted on the system, then training on its data. A
rerun of the step continues from its last checkpoint (`restart="auto"`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .common import (copy_outputs, dataset_fmt, pick_root, set_threads, split_paths, trace, train_config,
                     training_dir, user_errors_are_fatal, write_json)

OUTPUT_FILES = ["model.ckpt", "lcurve.csv", "lcurve.png", "train.json"]


def _ckpt(p: Path) -> Path:
    p = Path(p)
    return p / "model.ckpt" if p.is_dir() else p


def with_pretrained_model(config: dict, ckpt: Path) -> dict:
    """The fine-tune config must name a descriptor (deepmd-kit checks it; the weights come from the
    checkpoint): when the stage gives none, use the checkpoint's."""
    config = copy.deepcopy(config or {})
    model = config.setdefault("model", {})
    if "descriptor" not in model:
        from lamflow.model.checkpoint import read_checkpoint

        model["descriptor"] = read_checkpoint(ckpt)["config"]["descriptor"]
    return config


def run_finetune(config: dict, data: Path, system: str, pretrained: Path, out_dir: Path, *, type_map: list[str],
                 cleaned: Path | None = None, branch: str | None = None, freeze_descriptor: bool = False,
                 resume_dir: str | None = None, log=print) -> dict:
    """Fine-tune on `system` (staged data); write model.ckpt, lcurve.csv/png, train.json and
    summary.json into out_dir; return the summary."""
    from lamflow.model.finetune import finetune

    out = Path(out_dir)
    work = training_dir(out, resume_dir)
    ckpt = _ckpt(pretrained)
    root = pick_root(system, data, cleaned)
    cfg = train_config(with_pretrained_model(config, ckpt), type_map, split_paths(root, system, "train"),
                       split_paths(root, system, "valid"), dataset_fmt(root, system), source=f"stages.finetune ({system})")
    res = finetune(cfg, ckpt, work, branch=branch, freeze_descriptor=freeze_descriptor, restart="auto", log=log)
    copy_outputs(work, out, OUTPUT_FILES)
    keys = ("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom")
    summary = {"system": system, "metrics": {k: res.metrics[k] for k in keys if res.metrics.get(k) is not None},
               "steps": res.metrics.get("steps"), "train_wall_s": res.metrics.get("train_wall_s")}
    write_json(out / "summary.json", summary)
    return summary


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
        set_threads()
        out = Path(f"finetune-{ip['system']}")
        with user_errors_are_fatal():
            summary = run_finetune(ip["config"], ip["data"], ip["system"], ip["pretrained"], out,
                                   type_map=list(ip["type_map"]), cleaned=ip["cleaned"], branch=ip["branch"] or None,
                                   freeze_descriptor=ip["freeze_descriptor"], resume_dir=ip["resume_dir"] or None)
        return OPIO({"model": out, "summary": json.loads(json.dumps(summary))})

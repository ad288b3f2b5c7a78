"""Distill: the fine-tuned teacher explores and labels structures of one dataset; a small
se_e2_a student is trained on the labels (lamflow.model.distill). The report compares the
student with the teacher (held-out teacher-labelled frames) and both with DFT (the dataset's
valid split)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import TRAINING_FILES, model_file
from .common import copy_outputs, pick_root, set_threads, split_paths, trace, user_errors_are_fatal, write_json


def run_distill(config: dict, teacher: Path, data: Path, dataset: str, out_dir: Path, *, cleaned: Path | None = None,
                device: str = "auto", log=print) -> dict:
    """Distill `teacher` (a checkpoint, or a folder with model.ckpt) on `dataset`; write the
    student (model.ckpt), distill.json, the report plots and summary.json into out_dir."""
    from lamflow.model.config import parse_config
    from lamflow.model.distill import DistillConfig, distill

    cfg = parse_config(DistillConfig, config or {}, "stages.distill.config")
    out = Path(out_dir)
    root = pick_root(dataset, data, cleaned)
    ckpt = model_file(teacher)
    train, valid = split_paths(root, dataset, "train"), split_paths(root, dataset, "valid")
    work = out / "work"
    res = distill(ckpt, train, cfg, work, dft_valid=valid or None, device=device, log=log)  # teacher MD + labels on `device`
    copy_outputs(res.student_checkpoint.parent, out, TRAINING_FILES)
    copy_outputs(work, out, ["distill.json"])
    rep = work / "report"
    for png in rep.rglob("*.png") if rep.is_dir() else []:
        (out / "plots").mkdir(exist_ok=True)
        (out / "plots" / f"{png.parent.name}-{png.name}").write_bytes(png.read_bytes())
    m = res.metrics
    keys = ("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom")
    pick = lambda d: {k: d[k] for k in keys if d and d.get(k) is not None}  # noqa: E731
    summary = {"dataset": dataset, "counts": m.get("counts", {}),
               "student_vs_teacher": pick(m.get("student_vs_teacher")),
               "student": pick(m.get("student_vs_dft")), "teacher": pick(m.get("teacher_vs_dft")),
               "student_params": m.get("student", {}).get("train", {}).get("n_params")}
    write_json(out / "summary.json", summary)
    shutil.rmtree(work / "student", ignore_errors=True)  # the student is out/model.ckpt; labelled data stay in work/data
    return summary


class Distill(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "config": Parameter(dict),                      # lamflow.model.distill.DistillConfig keys
            "dataset": Parameter(str),                      # start structures (train) and DFT check (valid)
            "teacher_index": Parameter(int),                # which of `teachers` teaches
            "device": Parameter(str, default="auto"),       # teacher MD/labelling: the pod's GPU when it has one
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
            "data": Artifact(Path),                         # staged datasets
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
            "teachers": Artifact(List[Path]),               # fine-tuned model folders, one per system
        })

    @classmethod
    def get_output_sign(cls):
        return OPIOSign({
            "model": Artifact(Path),                        # folder: model.ckpt (student), distill.json, plots/, summary.json
            "summary": Parameter(dict),                     # student vs teacher vs DFT errors, frame counts
        })

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("distill")
        set_threads(ip["threads"])
        out = Path("distill")
        with user_errors_are_fatal():
            teacher = list(ip["teachers"])[ip["teacher_index"]]  # in slice order = stages.finetune.systems order
            summary = run_distill(ip["config"], teacher, ip["data"], ip["dataset"], out, cleaned=ip["cleaned"],
                                  device=ip["device"])
        return OPIO({"model": out, "summary": json.loads(json.dumps(summary))})

"""Distill: the fine-tuned teacher explores and labels structures of one dataset; a small
se_e2_a student is trained on the labels (lamflow.model.tasks.distill). The report compares the
student with the teacher (held-out teacher-labelled frames) and both with DFT (the dataset's
valid split).

With `nproc > 1` (resources.gpus: N) the exploration and labelling stay in this process (teacher
MD is cheap next to training), and only the student's training runs data-parallel under
`torchrun --standalone --nproc_per_node N` (ops/training.py, the same launcher and DDP code as
pretrain / finetune): one global batch of N x the student's batch_size; then the report
continues here on the trained student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import MODEL_FILE, TRAINING_FILES, model_file
from .common import copy_outputs, pick_root, set_threads, split_paths, trace, user_errors_are_fatal, write_json
from .training import launcher_for, run_training


def torchrun_student(launcher: list[str]):
    """distill()'s `train_student`: the student's TrainConfig trained under torchrun with `launcher`
    arguments (ops/torchrun.py), from scratch in its folder; returns the TrainResult rank 0 wrote."""
    from lamflow.model.training.trainer import TrainResult

    def train_student(tcfg, out_dir, log):
        out = Path(out_dir)
        shutil.rmtree(out, ignore_errors=True)  # as in one process: a fresh student, never a resumed one
        metrics = run_training("single", tcfg.model_dump(mode="json"), out, source="stages.distill.config.student",
                               launcher=launcher, log=log)
        return TrainResult(out, out / MODEL_FILE, out / "lcurve.csv", metrics)

    return train_student


def run_distill(config: dict, teacher: Path, data: Path, dataset: str, out_dir: Path, *, cleaned: Path | None = None,
                device: str = "auto", launcher: list[str] | None = None, log=print) -> dict:
    """Distill `teacher` (a checkpoint, or a folder with model.ckpt) on `dataset`; write the
    student (model.ckpt), distill.json, the report plots and summary.json into out_dir.
    `launcher`: torchrun arguments to train the student data-parallel (None: in this process)."""
    from lamflow.model.schema import parse_config
    from lamflow.model.tasks.distill import DistillConfig, distill

    cfg = parse_config(DistillConfig, config or {}, "stages.distill.config")
    out = Path(out_dir)
    root = pick_root(dataset, data, cleaned)
    ckpt = model_file(teacher)
    train, valid = split_paths(root, dataset, "train"), split_paths(root, dataset, "valid")
    work = out / "work"
    res = distill(ckpt, train, cfg, work, dft_valid=valid or None, device=device, log=log,  # teacher MD + labels on `device`
                  train_student=torchrun_student(launcher) if launcher else None)
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
            "config": Parameter(dict),                      # lamflow.model.tasks.distill.DistillConfig keys
            "dataset": Parameter(str),                      # start structures (train) and DFT check (valid)
            "teacher_index": Parameter(int),                # which of `teachers` teaches
            "device": Parameter(str, default="auto"),       # teacher MD/labelling: the pod's GPU when it has one
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
            "nproc": Parameter(int, default=1),             # processes (GPUs) of the pod: > 1, student under torchrun
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
                                  device=ip["device"], launcher=launcher_for(ip["nproc"]))
        return OPIO({"model": out, "summary": json.loads(json.dumps(summary))})

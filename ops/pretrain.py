"""Pretrain: train the base model on the pretraining datasets.

Several datasets train one multi-task model (one fitting head per dataset, shared descriptor)
when lamflow.model.training.multitask is available; a single dataset trains one energy model with
lamflow.model.training.trainer.train. Heads named in `config["denoise"]` (the spec's stages.pretrain.denoise)
are denoise branches on structures alone (label-free files converted by lamflow.model.data.structures);
they make the model multi-task even with one dataset. Either way the run continues from its last
checkpoint when the step is rerun (`restart="auto"` in `resume_dir`, or in the step's own output
folder), and on Argo from the checkpoint synced to the store (`checkpoint_store`,
ops/checkpoint_store.py) when the pod is gone. `nproc > 1` trains data-parallel under torchrun in the pod (ops/torchrun.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from dflow.python import OP, OPIO, Artifact, OPIOSign, Parameter

from .artifacts import TRAINING_FILES
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


def run_pretrain(config: dict, data: Path, datasets: list[str], out_dir: Path, *, type_map: list[str],
                 cleaned: Path | None = None, resume_dir: str | None = None, store: StoreConfig | None = None,
                 launcher: list[str] | None = None, threads: int = 0, log=print) -> dict:
    """Train on `datasets` (staged data); write model.ckpt, lcurve.csv/png, train.json and
    summary.json into out_dir. Returns the summary (headline numbers of the stage). `store`:
    sync checkpoints to (and resume from) the artifact store; `launcher`: torchrun arguments for
    data-parallel training (None: this process)."""
    out = Path(out_dir)
    work = training_dir(out, resume_dir)
    if len(datasets) > 1 or config.get("denoise"):  # denoise heads train only in a multi-task model
        return _run_multitask(config, data, datasets, out, work, type_map=type_map, cleaned=cleaned, store=store,
                              launcher=launcher, threads=threads, log=log)
    name = datasets[0]
    root = pick_root(name, data, cleaned)
    cfg = train_config_dict(config, type_map, split_paths(root, name, "train"), split_paths(root, name, "valid"),
                            dataset_fmt(root, name), threads)
    metrics = run_training("single", cfg, work, source=f"stages.pretrain ({name})", store=store, launcher=launcher, log=log)
    copy_outputs(work, out, TRAINING_FILES)
    heads = {name: {"train": split_paths(root, name, "train"), "valid": split_paths(root, name, "valid"),
                    "fmt": dataset_fmt(root, name)}}
    summary = {"kind": "single-task", "heads": _with_baselines({name: _headline(metrics)}, heads, type_map),
               "steps": metrics.get("steps"), "train_wall_s": metrics.get("train_wall_s")}
    write_json(out / "summary.json", summary)
    return summary


def _run_multitask(config: dict, data: Path, datasets: list[str], out: Path, work: Path, *, type_map, cleaned, store,
                   launcher, threads, log) -> dict:
    heads = {}
    for name in datasets:
        root = pick_root(name, data, cleaned)
        heads[name] = {"train": split_paths(root, name, "train"), "valid": split_paths(root, name, "valid"),
                       "fmt": dataset_fmt(root, name)}
        if name in (config.get("denoise") or {}):
            heads[name] = _structures(heads[name])
    from lamflow.model.training.multitask_config import multitask_layout

    cfg = multitask_layout(config, heads, type_map, threads)
    metrics = run_training("multitask", cfg, work, source="stages.pretrain", store=store, launcher=launcher, log=log)
    copy_outputs(work, out, TRAINING_FILES)
    energy_heads = {h: p for h, p in heads.items() if h not in (config.get("denoise") or {})}
    summary = {"kind": "multi-task",
               "heads": _with_baselines({h: _headline(m) for h, m in metrics.get("branches", {}).items()}, energy_heads,
                                        type_map),
               "steps": metrics.get("steps"), "train_wall_s": metrics.get("train_wall_s")}
    write_json(out / "summary.json", summary)
    return summary


def _structures(head: dict) -> dict:
    """A denoise head's paths as deepmd/npy structure folders (CIF, POSCAR, extxyz converted once,
    cached; lamflow.model.data.structures)."""
    from lamflow.model.data.structures import structure_paths

    train, fmt = structure_paths(head["train"], head["fmt"])
    valid = structure_paths(head["valid"], head["fmt"])[0] if head["valid"] else []
    return {"train": train, "valid": valid, "fmt": fmt}


def _with_baselines(headlines: dict[str, dict], heads: dict[str, dict], type_map: list[str]) -> dict[str, dict]:
    """Each energy head's validation errors next to its dataset's composition-only baseline
    (lamflow.model.tasks.baseline), as the test stage reports them: "normalised" per metric."""
    from lamflow.model.tasks.baseline import dataset_baseline, normalised

    for h, paths in heads.items():
        if h in headlines and paths.get("valid"):
            base = dataset_baseline(paths["train"], paths["valid"], type_map, paths["fmt"])
            headlines[h] = {**headlines[h], "nframes": base["nframes"], "normalised": normalised(headlines[h], base)}
    return headlines


def _headline(m: dict) -> dict:
    keys = ("rmse_e_per_atom", "rmse_f", "rmse_v_per_atom", "rmse_coord", "ce_type", "acc_type")  # energy, denoise heads
    return {k: m[k] for k in keys if m.get(k) is not None}


def pretrain_outputs() -> OPIOSign:
    """What a pretrain step hands on (also the multi-node stage's collect step, ops/trainjob.py)."""
    return OPIOSign({
        "model": Artifact(Path),                        # folder: model.ckpt, lcurve.csv/png, train.json, summary.json
        "summary": Parameter(dict),                     # headline numbers (validation RMSEs per head)
    })


class Pretrain(OP):
    @classmethod
    def get_input_sign(cls):
        return OPIOSign({
            "config": Parameter(dict),                      # model/learning_rate/loss/training (deepmd-kit keys), denoise
            "datasets": Parameter(List[str]),               # pretraining datasets: one head each
            "type_map": Parameter(List[str]),               # the pipeline's elements
            "resume_dir": Parameter(str, default=""),       # checkpoint folder that survives a failed step
            "checkpoint_store": Parameter(dict, default={}),  # S3 place the checkpoint is synced to ({}: none)
            "nproc": Parameter(int, default=1),             # processes (GPUs) of the pod: > 1 runs torchrun
            "threads": Parameter(int, default=0),           # torch threads (0: torch's default)
            "data": Artifact(Path),                         # staged datasets (ops.common layout)
            "cleaned": Artifact(Path, optional=True),       # the clean stage's output, when it ran
        })

    @classmethod
    def get_output_sign(cls):
        return pretrain_outputs()

    @OP.exec_sign_check
    def execute(self, ip: OPIO) -> OPIO:
        trace("pretrain")
        set_threads(ip["threads"])
        out = Path("pretrain")
        with user_errors_are_fatal():
            summary = run_pretrain(ip["config"], ip["data"], list(ip["datasets"]), out, type_map=list(ip["type_map"]),
                                   cleaned=ip["cleaned"], resume_dir=ip["resume_dir"] or None,
                                   store=StoreConfig.from_param(ip["checkpoint_store"]),
                                   launcher=launcher_for(ip["nproc"]), threads=ip["threads"])
        return OPIO({"model": out, "summary": json.loads(json.dumps(summary))})

"""Knowledge distillation: a large teacher -> a small, fast se_e2_a student (the DPA-2 paper's
workflow; deepmd-kit has no single command for it).

1. explore  MD with the teacher from the training structures, duplicates dropped (tasks/explore.py)
2. label    the teacher labels the kept frames; a trust check drops doubtful ones (tasks/explore.py)
3. write    deepmd/npy systems: data/train/sys.NNN and data/test/sys.NNN (`test_fraction` of each
            system's labelled frames held out, at least one when a system has two or more).
4. student  se_e2_a trained with lamflow.model.training.trainer.train on the teacher labels (+ DFT data),
            validated on the held-out frames; its checkpoint stores min_nbor_dist for compression.
5. report   distill.json with every count, the student's errors vs the teacher (held-out frames)
            and vs DFT (dft_valid; the teacher's too, for reference), and parity plots.
Counts add up: sampled = duplicates + over_max_frames + dropped_max_force + dropped_disagreement
+ train_frames + test_frames (sampled: frames of the runs that completed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
from pydantic import Field

from lamflow.model.data.batch import min_neighbor_distance
from lamflow.model.data.systems import System, elements_in, load_systems
from lamflow.model.errors import ConfigError, DataError
from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.model.io.files import atomic_save, atomic_write_text
from lamflow.model.nn.config import FittingConfig, ModelConfig
from lamflow.model.nn.descriptor_config import SeE2AConfig
from lamflow.model.schema import Strict, parse_config
from lamflow.model.tasks.evaluate import evaluate_systems
from lamflow.model.tasks.explore import Counts, ExplorationConfig, LabellingConfig, explore, label
from lamflow.model.training.config import (
    DataConfig,
    LearningRateConfig,
    LossConfig,
    TrainConfig,
    TrainingConfig,
    TrainingLoopConfig,
    read_yaml,
)
from lamflow.model.training.trainer import train as train_model

# ----------------------------------------------------------------------------- config


class StudentModelConfig(Strict):
    type_map: list[str] | None = None  # default: the elements of the data, in the teacher's order
    descriptor: SeE2AConfig = SeE2AConfig()
    fitting_net: FittingConfig = FittingConfig()
    data_stat_nbatch: int = Field(10, gt=0)
    data_stat_protect: float = 1e-2


class StudentTrainingConfig(TrainingLoopConfig):
    """TrainingConfig without the data sections (distillation makes them)."""

    batch_size: Union[int, str] = "auto"
    valid_batch_size: Union[int, str] = "auto"
    numb_btch: int = Field(1, gt=0)


class StudentConfig(Strict):
    model: StudentModelConfig = StudentModelConfig()
    learning_rate: LearningRateConfig = LearningRateConfig()
    loss: LossConfig = LossConfig()
    training: StudentTrainingConfig = StudentTrainingConfig()


class DistillConfig(Strict):
    exploration: ExplorationConfig = ExplorationConfig()
    labelling: LabellingConfig = LabellingConfig()
    student: StudentConfig = StudentConfig()
    test_fraction: float = Field(0.1, ge=0, lt=1)  # teacher-labelled frames held out for the report
    seed: int | None = None  # exploration, splitting (the student has its own)
    fmt: str = "auto"  # dpdata format of the training structures


def load_distill_config(path: str | os.PathLike) -> DistillConfig:
    return parse_config(DistillConfig, read_yaml(Path(path)), str(path))


# ----------------------------------------------------------------------------- exploration


# ----------------------------------------------------------------------------- labelling


def write_npy(s: System, folder: str | os.PathLike) -> Path:
    """One system in deepmd/npy (type.raw, type_map.raw, set.000/*.npy, nopbc when non-periodic)."""
    folder = Path(folder)
    (folder / "set.000").mkdir(parents=True, exist_ok=True)
    (folder / "type.raw").write_text("\n".join(str(int(t)) for t in s.atype) + "\n")
    (folder / "type_map.raw").write_text("\n".join(s.elements) + "\n")
    nf = s.nframes
    np.save(folder / "set.000" / "coord.npy", s.coord.reshape(nf, -1))
    if s.box is None:
        (folder / "nopbc").write_text("")
    else:
        np.save(folder / "set.000" / "box.npy", s.box.reshape(nf, 9))
    for key in ("energy", "force", "virial"):
        a = getattr(s, key)
        if a is not None:
            np.save(folder / "set.000" / f"{key}.npy", a.reshape(nf, -1) if key != "energy" else a.reshape(nf))
    return folder


def split_and_write(systems: list[System], data_dir: Path, test_fraction: float, counts: Counts,
                    seed: int | None = None) -> tuple[list[str], list[str]]:
    """data_dir/train/<sys> and data_dir/test/<sys>, written into a temporary folder and renamed."""
    rng = np.random.default_rng(seed)
    tmp = data_dir.with_name(data_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train, test = [], []
    for s in systems:
        order = rng.permutation(s.nframes)
        nt = int(round(test_fraction * s.nframes))
        if test_fraction > 0 and s.nframes >= 2:
            nt = min(max(nt, 1), s.nframes - 1)
        elif s.nframes < 2:
            nt = 0
        te, tr = np.sort(order[:nt]), np.sort(order[nt:])
        write_npy(s.subset(tr), tmp / "train" / s.name)
        train.append(str(data_dir / "train" / s.name))
        counts.train_frames += len(tr)
        if nt:
            write_npy(s.subset(te), tmp / "test" / s.name)
            test.append(str(data_dir / "test" / s.name))
            counts.test_frames += nt
    shutil.rmtree(data_dir, ignore_errors=True)
    os.replace(tmp, data_dir)
    return train, test


# ----------------------------------------------------------------------------- the whole stage


@dataclass
class DistillResult:
    student_checkpoint: Path
    data_dir: Path  # data/train/*, data/test/* (deepmd/npy, teacher labels)
    report_json: Path  # distill.json
    metrics: dict  # the report's content


def _load_teacher(path, device: str, branch: str | None = None):
    model = load_model(path, device)
    if model.kind == "multitask":
        model = model.branch_model(branch)
    if not hasattr(model, "atomic_energy"):
        raise ConfigError(f"{path}: a {model.kind!r} model cannot label energies")
    return model.eval()


def student_train_config(cfg: StudentConfig, type_map: list[str], train: list[str], valid: list[str]) -> TrainConfig:
    m, t = cfg.model, cfg.training
    model = ModelConfig(type_map=type_map, descriptor=m.descriptor, fitting_net=m.fitting_net,
                        data_stat_nbatch=m.data_stat_nbatch, data_stat_protect=m.data_stat_protect)
    training = TrainingConfig(
        training_data=DataConfig(systems=train, batch_size=t.batch_size),
        validation_data=DataConfig(systems=valid, batch_size=t.valid_batch_size, numb_btch=t.numb_btch) if valid else None,
        numb_steps=t.numb_steps, seed=t.seed, disp_freq=t.disp_freq, save_freq=t.save_freq, max_ckpt_keep=t.max_ckpt_keep,
        device=t.device, num_threads=t.num_threads)
    return TrainConfig(model=model, learning_rate=cfg.learning_rate, loss=cfg.loss, training=training)


def distill(teacher: str | os.PathLike, systems: list[str], cfg: DistillConfig, out_dir: str | os.PathLike, *,
            dft_train: list[str] | None = None, dft_valid: list[str] | None = None, teacher_branch: str | None = None,
            device: str = "auto", log: Callable = print, train_student: Callable | None = None) -> DistillResult:
    """Explore with the teacher, label, train the se_e2_a student, report (module docstring).
    `systems`: training structures (any dpdata format, `cfg.fmt`); dft_train / dft_valid: DFT-labelled
    deepmd systems added to the student's training data / used for the student-vs-DFT report.
    `train_student(train_config, out_dir, log) -> TrainResult` trains the student (default: train
    in this process; the distill OP passes one that runs it data-parallel under torchrun)."""

    out = Path(out_dir)
    t0 = time.time()
    # everything that can be wrong with the inputs fails here, before any MD
    tmodel = _load_teacher(teacher, device, teacher_branch)
    second = _load_teacher(cfg.labelling.trust.second_teacher, device) if cfg.labelling.trust.second_teacher else None
    starts = load_systems(systems, list(tmodel.type_map), cfg.fmt, labeled=False)
    dft_tr = load_systems(dft_train, list(tmodel.type_map)) if dft_train else []
    dft_va = load_systems(dft_valid, list(tmodel.type_map)) if dft_valid else []
    present = set(elements_in(systems, cfg.fmt)) | {e for p in (dft_train or []) for e in elements_in(p)}
    student_tm = list(cfg.student.model.type_map or [e for e in tmodel.type_map if e in present])
    missing = sorted(present - set(student_tm))
    if missing:
        raise ConfigError(f"student.model.type_map {student_tm} lacks element(s) {', '.join(missing)} of the data")
    if second is not None:
        missing = sorted(present - set(second.type_map))
        if missing:
            raise ConfigError(f"second_teacher: element(s) {', '.join(missing)} not in its type map {second.type_map}")
    out.mkdir(parents=True, exist_ok=True)

    counts = Counts()
    frames = explore(tmodel, starts, cfg.exploration, counts, cfg.seed, log,
                     min_nbor_dist=read_checkpoint(teacher).get("min_nbor_dist"))
    t1 = time.time()
    labelled, deviation = label(tmodel, frames, cfg.labelling, counts, second, log)
    t2 = time.time()
    if not labelled:
        raise DataError(f"distill: none of the {counts.sampled} explored frames survived (duplicates {counts.duplicates}, "
                        f"dropped by max_force {counts.dropped_max_force}, by disagreement {counts.dropped_disagreement}; "
                        f"{counts.md_runs_failed} of {counts.md_runs} MD runs stopped by the guards {counts.md_stops}); "
                        f"loosen labelling.trust or explore more")
    data_dir = out / "data"
    train_dirs, test_dirs = split_and_write(labelled, data_dir, cfg.test_fraction, counts, cfg.seed)
    log(f"distill data: {counts.train_frames} training / {counts.test_frames} held-out teacher-labelled frames in {data_dir}")

    tcfg = student_train_config(cfg.student, student_tm, train_dirs + [str(p) for p in (dft_train or [])], test_dirs)
    res = (train_student or (lambda c, o, lg: train_model(c, o, log=lg)))(tcfg, out / "student", log)
    t3 = time.time()
    student = load_model(res.checkpoint, device)
    stamp_min_nbor_dist(res.checkpoint, labelled + dft_tr, student.descriptor.cfg.rcut)

    report: dict = {"teacher": str(teacher), "second_teacher": cfg.labelling.trust.second_teacher,
                    "systems": [str(p) for p in systems], "config": cfg.model_dump(mode="json"),
                    "counts": vars(counts), "force_disagreement": deviation,
                    "student": {"checkpoint": str(res.checkpoint), "type_map": student_tm, "train": res.metrics}}
    rdir = out / "report"
    if test_dirs:
        held = load_systems(test_dirs, student_tm)
        report["student_vs_teacher"] = evaluate_systems(student, held, rdir / "student_vs_teacher", "student vs teacher (held-out teacher labels)",
                                                        who=("teacher", "student"))["overall"]
    if dft_va:
        report["student_vs_dft"] = evaluate_systems(student, load_systems(dft_valid, student_tm), rdir / "student_vs_dft",
                                                    "student vs DFT", who=("DFT", "student"))["overall"]
        report["teacher_vs_dft"] = evaluate_systems(tmodel, dft_va, rdir / "teacher_vs_dft", "teacher vs DFT",
                                                    who=("DFT", "teacher"))["overall"]
    report["timings_s"] = {"explore": t1 - t0, "label": t2 - t1, "train": t3 - t2, "report": time.time() - t3}
    rj = atomic_write_text(out / "distill.json", json.dumps(report, indent=2, default=str))
    for key in ("student_vs_teacher", "student_vs_dft"):
        if key in report:
            m = report[key]
            log(f"{key}: E {1000 * m.get('rmse_e_per_atom', float('nan')):.2f} meV/atom, F {1000 * m.get('rmse_f', float('nan')):.1f} meV/A")
    return DistillResult(Path(res.checkpoint), data_dir, rj, report)


def stamp_min_nbor_dist(checkpoint: str | os.PathLike, systems: list[System], rcut: float) -> float:
    """Store the closest pair distance of the training data in the checkpoint (what `compress` needs)."""

    d = min_neighbor_distance(systems, rcut)
    payload = read_checkpoint(checkpoint)
    if np.isfinite(d):
        payload["min_nbor_dist"] = float(d)
        atomic_save(payload, checkpoint)
    return d

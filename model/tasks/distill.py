"""Knowledge distillation: a large teacher -> a small, fast se_e2_a student (the DPA-2 paper's
workflow; deepmd-kit has no single command for it).

1. explore  MD with the teacher (Langevin) from the training structures: for every start frame,
            cell strain (periodic systems only) and temperature one run of `steps` steps, the
            start positions optionally displaced uniformly in [-perturb, perturb] A; a frame is
            sampled every `sample_every` steps (step 0 included). Frames of a system whose
            coordinates and cell all differ by less than `dedup_tol` A from a kept frame are
            duplicates; at most `max_frames` are kept (evenly thinned). A run stopped by the MD
            guards (md.py: temperature runaway, close contact, non-finite energy; bounds
            `max_temperature`, `min_distance`, defaults as `lamflow md`) is dropped whole: its
            frames count as dropped_unstable, the run in md_runs_failed and md_stops[status].
2. label    the teacher labels every kept frame (energy, force, virial) in batches. Trust check:
            a frame is dropped when some teacher force exceeds `max_force` (eV/A), or else when
            the teacher and a second teacher disagree on some force by more than
            `max_force_disagreement` (eV/A, max over atoms of |F1 - F2|, dpgen's model deviation).
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
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Callable, Union

import numpy as np
from pydantic import Field, model_validator

from lamflow.model.data.batch import min_neighbor_distance
from lamflow.model.data.systems import System, elements_in, load_systems
from lamflow.model.errors import ConfigError, DataError
from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.model.io.files import atomic_save, atomic_write_text
from lamflow.model.nn.config import FittingConfig, ModelConfig
from lamflow.model.nn.descriptor_config import SeE2AConfig
from lamflow.model.nn.infer import evaluate
from lamflow.model.schema import Strict, parse_config
from lamflow.model.tasks.calculator import LamflowCalculator
from lamflow.model.tasks.evaluate import evaluate_systems
from lamflow.model.tasks.md import MDGuards, SimulationError, run_md, system_to_atoms
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


class ExplorationConfig(Strict):
    temperatures: list[float] = Field([300.0], min_length=1)  # K, one Langevin run per temperature
    steps: int = Field(200, ge=1)  # MD steps per run
    timestep: float = Field(0.5, gt=0)  # fs
    friction: float = Field(0.01, gt=0)  # 1/fs
    sample_every: int = Field(10, ge=1)  # steps between sampled frames
    strains: list[float] = [0.0]  # isotropic linear cell strains, e.g. [-0.02, 0, 0.02] (periodic systems only)
    perturb: float = Field(0.0, ge=0)  # A, uniform random displacement of every start structure
    starts_per_system: int = Field(1, ge=1)  # start frames per training system, evenly spaced
    max_frames: int = Field(1000, ge=1)  # frames kept after deduplication, over all systems
    dedup_tol: float = Field(1e-3, ge=0)  # A
    max_temperature: float | None = Field(None, gt=0)  # K, a run above it is dropped (None: 5 x its temperature, >= 1000 K)
    min_distance: float | None = Field(None, ge=0)  # A, a run with a closer pair is dropped (None: 0.9 x the teacher's
    # min_nbor_dist when its checkpoint stores one, else 0.5 A; 0: never)

    @model_validator(mode="after")
    def _check(self):
        if any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be > 0 K, got {self.temperatures}")
        if any(s <= -1 for s in self.strains):
            raise ValueError(f"strains must be > -1, got {self.strains}")
        return self


class TrustConfig(Strict):
    max_force: float | None = Field(None, gt=0)  # eV/A: frames with a larger teacher force are dropped
    second_teacher: str | None = None  # checkpoint of a second teacher (model deviation)
    max_force_disagreement: float | None = Field(None, gt=0)  # eV/A

    @model_validator(mode="after")
    def _check(self):
        if (self.second_teacher is None) != (self.max_force_disagreement is None):
            raise ValueError("second_teacher and max_force_disagreement go together")
        return self


class LabellingConfig(Strict):
    batch_size: int = Field(8, ge=1)  # frames per teacher evaluation
    trust: TrustConfig = TrustConfig()


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


@dataclass
class Frames:
    """Sampled configurations of one system (one atom order)."""

    name: str
    elements: list[str]  # type map of atype
    atype: np.ndarray  # [natoms]
    coord: list[np.ndarray] = field(default_factory=list)  # each [natoms, 3]
    box: list[np.ndarray | None] = field(default_factory=list)  # each [3, 3] or None

    @property
    def pbc(self) -> bool:
        return bool(self.box) and self.box[0] is not None

    def __len__(self) -> int:
        return len(self.coord)


@dataclass
class Counts:
    md_runs: int = 0
    md_runs_failed: int = 0  # runs stopped by the MD guards (their frames dropped)
    md_stops: dict = field(default_factory=dict)  # MDResult.status -> runs
    dropped_unstable: int = 0  # frames sampled by those runs before they stopped
    sampled: int = 0
    duplicates: int = 0
    over_max_frames: int = 0
    dropped_max_force: int = 0
    dropped_disagreement: int = 0
    labelled: int = 0
    train_frames: int = 0
    test_frames: int = 0


def explore(teacher, systems: list[System], cfg: ExplorationConfig, counts: Counts, seed: int | None = None,
            log: Callable = print, min_nbor_dist: float | None = None) -> list[Frames]:
    """Teacher MD from every system (module docstring, step 1); deduplicated and capped.
    `min_nbor_dist`: of the teacher's training data, for the default close-contact bound."""

    calc = LamflowCalculator(teacher, device=str(teacher.out_bias.device))
    calc.min_nbor_dist = min_nbor_dist or calc.min_nbor_dist
    guards = MDGuards(max_temperature=cfg.max_temperature, min_distance=cfg.min_distance)
    rng = np.random.default_rng(seed)
    out: list[Frames] = []
    if any(not s.pbc for s in systems) and any(e != 0 for e in cfg.strains):
        log("explore: cell strains are skipped for non-periodic systems")
    for si, s in enumerate(systems):
        fr = Frames(f"sys.{si:03d}", list(s.elements), s.atype.copy())

        def sample(step, atoms, fr=fr, pbc=s.pbc):
            fr.coord.append(atoms.positions.copy())
            fr.box.append(atoms.cell.array.copy() if pbc else None)

        starts = np.unique(np.linspace(0, s.nframes - 1, min(cfg.starts_per_system, s.nframes)).round().astype(int))
        for k, strain, temp in product(starts.tolist(), cfg.strains if s.pbc else [0.0], cfg.temperatures):
            atoms = start_structure(s, k, strain, cfg.perturb, rng)
            counts.md_runs += 1
            n0 = len(fr)
            try:
                res = run_md(atoms, calc, ensemble="nvt", temperature=temp, steps=cfg.steps, timestep=cfg.timestep,
                             friction=cfg.friction, interval=cfg.sample_every, seed=int(rng.integers(2**31)),
                             guards=guards, on_sample=sample, log=lambda *a: None)
                status, why = res.status, f"step {res.stopped_at_step}: {res.message}"
            except SimulationError as e:
                status, why = "error", str(e)
            if status != "completed":  # drop the whole run: the frames before the stop are suspect too
                counts.md_runs_failed += 1
                counts.md_stops[status] = counts.md_stops.get(status, 0) + 1
                counts.dropped_unstable += len(fr) - n0
                del fr.coord[n0:], fr.box[n0:]
                log(f"explore {s.name} frame {k} strain {strain:+g} T {temp:g} K: dropped, {status} ({why})")
            log(f"explore {s.name} frame {k} strain {strain:+g} T {temp:g} K: {len(fr) - n0} frames")
        counts.sampled += len(fr)
        out.append(fr)
    for fr in out:
        counts.duplicates += dedup(fr, cfg.dedup_tol)
    total = sum(len(f) for f in out)
    if total > cfg.max_frames:  # thin evenly over all systems
        keep = set(np.linspace(0, total - 1, cfg.max_frames).round().astype(int).tolist())
        g = 0
        for fr in out:
            idx = [i for i in range(len(fr)) if g + i in keep]
            g += len(fr)
            fr.coord, fr.box = [fr.coord[i] for i in idx], [fr.box[i] for i in idx]
        counts.over_max_frames = total - sum(len(f) for f in out)
    return [f for f in out if len(f)]


def start_structure(s: System, frame: int, strain: float, perturb: float, rng: np.random.Generator):
    """Frame `frame` of `s` as ase.Atoms, its cell (and atoms) scaled by 1 + strain, positions
    displaced uniformly in [-perturb, perturb] A."""

    atoms = system_to_atoms(s, frame)
    if strain != 0:
        atoms.set_cell(atoms.cell.array * (1 + strain), scale_atoms=True)
    if perturb > 0:
        atoms.positions = atoms.positions + rng.uniform(-perturb, perturb, atoms.positions.shape)
    return atoms


def dedup(fr: Frames, tol: float) -> int:
    """Drop frames within `tol` A (every coordinate and cell entry) of an earlier kept one; returns the count."""
    if len(fr) < 2:
        return 0
    X = np.stack([np.concatenate([c.ravel(), (b if b is not None else np.zeros((3, 3))).ravel()])
                  for c, b in zip(fr.coord, fr.box)])  # [n, 3 natoms + 9]
    kept: list[int] = []
    for i in range(len(X)):
        if kept and np.min(np.max(np.abs(X[kept] - X[i]), axis=1)) <= tol:
            continue
        kept.append(i)
    dropped = len(X) - len(kept)
    fr.coord, fr.box = [fr.coord[i] for i in kept], [fr.box[i] for i in kept]
    return dropped


# ----------------------------------------------------------------------------- labelling


def label(teacher, frames: list[Frames], cfg: LabellingConfig, counts: Counts, second=None,
          log: Callable = print) -> tuple[list[System], dict]:
    """Teacher labels + trust check (module docstring, step 2). Returns labelled systems (atype
    indexes the teacher's type map) and force-disagreement statistics (empty without a second teacher)."""

    t = cfg.trust
    out, dev_all = [], []
    for fr in frames:
        coord = np.stack(fr.coord)
        box = np.stack(fr.box) if fr.pbc else None
        atype = _retype(fr, teacher.type_map)
        lab = evaluate(teacher, coord, box, atype, virial=fr.pbc, batch_size=cfg.batch_size)
        ok = np.ones(len(coord), dtype=bool)
        fmax = np.linalg.norm(lab["force"], axis=-1).max(axis=-1)  # [nf]
        if t.max_force is not None:
            bad = fmax > t.max_force
            counts.dropped_max_force += int(bad.sum())
            ok &= ~bad
        if second is not None:
            f2 = evaluate(second, coord, box, _retype(fr, second.type_map), virial=False, batch_size=cfg.batch_size)["force"]
            dev = np.linalg.norm(lab["force"] - f2, axis=-1).max(axis=-1)  # [nf] max over atoms
            dev_all.append(dev)
            bad = ok & (dev > t.max_force_disagreement)
            counts.dropped_disagreement += int(bad.sum())
            ok &= ~bad
        counts.labelled += int(ok.sum())
        log(f"label {fr.name}: {len(coord)} frames, {int(ok.sum())} kept (max |F| up to {fmax.max():.3g} eV/A)")
        if ok.any():
            out.append(System(fr.name, list(teacher.type_map), atype, coord[ok], None if box is None else box[ok],
                              lab["energy"][ok], lab["force"][ok], lab["virial"][ok] if "virial" in lab else None))
    stats = {}
    if dev_all:
        d = np.concatenate(dev_all)
        stats = {"mean": float(d.mean()), "max": float(d.max()), "min": float(d.min())}
    return out, stats


def _retype(fr: Frames, type_map: list[str]) -> np.ndarray:
    names = [fr.elements[i] for i in fr.atype]
    missing = sorted(set(names) - set(type_map))
    if missing:
        raise DataError(f"{fr.name}: element(s) {', '.join(missing)} not in the model type map {type_map}")
    return np.array([type_map.index(n) for n in names], dtype=np.int64)


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

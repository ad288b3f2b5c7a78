"""Exploration and labelling for distillation (tasks/distill.py runs them, then writes and trains):

explore  MD with the teacher (Langevin) from the training structures: for every start frame,
         cell strain (periodic systems only) and temperature one run of `steps` steps, the
         start positions optionally displaced uniformly in [-perturb, perturb] A; a frame is
         sampled every `sample_every` steps (step 0 included). Frames of a system whose
         coordinates and cell all differ by less than `dedup_tol` A from a kept frame are
         duplicates; at most `max_frames` are kept (evenly thinned). A run stopped by the MD
         guards (md.py: temperature runaway, close contact, non-finite energy; bounds
         `max_temperature`, `min_distance`, defaults as `lamflow md`) is dropped whole: its
         frames count as dropped_unstable, the run in md_runs_failed and md_stops[status].
label    the teacher labels every kept frame (energy, force, virial) in batches. Trust check:
         a frame is dropped when some teacher force exceeds `max_force` (eV/A), or else when
         the teacher and a second teacher disagree on some force by more than
         `max_force_disagreement` (eV/A, max over atoms of |F1 - F2|, dpgen's model deviation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Callable

import numpy as np
from pydantic import Field, model_validator

from lamflow.model.data.systems import System
from lamflow.model.errors import DataError
from lamflow.model.nn.infer import evaluate
from lamflow.model.schema import Strict
from lamflow.model.tasks.calculator import LamflowCalculator
from lamflow.model.tasks.md import MDGuards, SimulationError, run_md, system_to_atoms


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

"""Frame checks: the rules that find frames whose labels or geometry cannot be right (`lamflow
clean` drops them; training warns about them on a sample, training/data_warnings.py).

Rules, in order; a frame is dropped by the first rule it fails and listed as
(system, frame, reason, value):

  non_finite      NaN or inf in coord, box, energy, force or virial
  max_force       max_i |F_i| > max_force                                       value: eV/A
  min_distance    two atoms (or an atom and a periodic image) closer than
                  min_distance                                                  value: A
  energy_outlier  |z| > energy_outlier_z for the residual per atom of the per-element linear fit
                      N b = E           N [nframes, ntypes] atom counts, b [ntypes] eV
                      r = (E - N b) / natoms
                      z = (r - median r) / max(1.4826 MAD r, energy_outlier_floor)
                  MAD = median |r - median r| (1.4826 MAD = sigma for a normal law). b is refit
                  without the outliers until the set of outliers is stable. One fit per input
                  path: energy references differ between sources.                value: z
  duplicate       same atoms in the same order, the same cell, every atom within duplicate_tol
  near_duplicate  of an earlier kept frame after removing a rigid translation (minimum image),
                  and energy per atom and forces within duplicate_label_tol. The first one is
                  kept. Frames with the same structure but different labels (the first steps of
                  an MD run) are kept and counted as `similar`.                 value: A
(singular_cell: a cell of (nearly) zero volume, found while reading; tasks/clean.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import Field
from scipy.spatial import cKDTree

from lamflow.model.data.composition import energy_bias
from lamflow.model.data.neighbor import find_pairs
from lamflow.model.data.systems import System
from lamflow.model.schema import Strict


class RuleConfig(Strict):
    """The rules' limits (lamflow clean's CleanConfig adds its other settings to these)."""

    max_force: float = Field(200.0, gt=0)  # eV/A; failed SCF runs give 1e2-1e4
    energy_outlier_z: float = Field(8.0, gt=0)  # robust z-score of the residual per atom
    energy_outlier_floor: float = Field(1e-3, ge=0)  # eV/atom, smallest spread used in z (near-identical energies)
    duplicate_tol: float = Field(1e-3, ge=0)  # A, max |delta r| of a near duplicate
    duplicate_label_tol: float = Field(1e-5, ge=0)  # eV/atom and eV/A: labels must agree this well
    min_distance: float = Field(0.5, ge=0)  # A


REASONS = ("non_finite", "singular_cell", "max_force", "min_distance", "energy_outlier", "duplicate", "near_duplicate")


@dataclass
class Drop:
    system: str
    frame: int
    reason: str
    value: float
    detail: str = ""


@dataclass
class Source:
    name: str  # unique, readable: input path past the inputs' common folder + sub path; the output folder
    path: str
    group: int  # index of the input path (one energy fit per group)
    system: System
    singular: dict = field(default_factory=dict)  # frame -> cell volume, for frames with a singular cell


def non_finite(s: System) -> list[tuple[int, str]]:
    """(frame, key) for each frame with a NaN/inf (first offending key)."""
    out: dict[int, str] = {}
    for key in ("coord", "box", "energy", "force", "virial"):
        a = getattr(s, key)
        if a is None:
            continue
        bad = ~np.isfinite(a.reshape(s.nframes, -1)).all(axis=1)
        for k in np.nonzero(bad)[0]:
            out.setdefault(int(k), key)
    return sorted(out.items())


def max_atomic_force(s: System) -> np.ndarray:
    """[nframes] max_i |F_i| (eV/A)."""
    return np.linalg.norm(s.force, axis=-1).max(axis=1)


def min_distance(s: System, k: int, cutoff: float) -> float:
    """Smallest interatomic distance of frame k below `cutoff` (periodic images included), else inf."""
    p = find_pairs(s.coord[k], None if s.box is None else s.box[k], cutoff)
    return float(p.d.min()) if len(p.d) else float("inf")


def energy_zscores(systems: list[System], keep: list[np.ndarray], ntypes: int, z_max: float,
                   floor: float) -> list[np.ndarray] | None:
    """Robust z of the per-atom residual of the per-element fit (module docstring), NaN where not
    kept; None when the frames are too few to judge (fewer than ntypes present + 3)."""
    idx = [i for i, s in enumerate(systems) if s.energy is not None]
    n = sum(int(keep[i].sum()) for i in idx)
    present = {t for i in idx for t in systems[i].atype.tolist()}
    if n < len(present) + 3:
        return None
    inlier = [keep[i].copy() for i in idx]
    for _ in range(10):
        bias, _ = energy_bias([systems[i].subset(np.nonzero(m)[0]) for i, m in zip(idx, inlier)], ntypes)
        r = [(systems[i].energy - systems[i].counts(ntypes) @ bias) / systems[i].natoms for i in idx]
        pool = np.concatenate([ri[keep[i]] for ri, i in zip(r, idx)])
        med = np.median(pool)
        scale = max(1.4826 * np.median(np.abs(pool - med)), floor)
        z = [(ri - med) / scale for ri in r]
        new = [keep[i] & (np.abs(zi) <= z_max) for zi, i in zip(z, idx)]
        if all((a == b).all() for a, b in zip(new, inlier)):
            break
        inlier = new
    out = [np.full(s.nframes, np.nan) for s in systems]
    for zi, i in zip(z, idx):
        out[i] = np.where(keep[i], zi, np.nan)
    return out


def structure_keys(s: System) -> np.ndarray:
    """[nframes, 3 natoms (+9)] translation-free coordinates (+ cell) compared with max |.|:
    positions relative to atom 0 (minimum image when periodic), then centred."""
    rel = s.coord - s.coord[:, :1]  # [nf, natoms, 3]
    if s.box is not None:
        frac = np.einsum("fai,fij->faj", rel, np.linalg.inv(s.box))
        rel = np.einsum("fai,fij->faj", frac - np.round(frac), s.box)
    rel = rel - rel.mean(axis=1, keepdims=True)
    key = rel.reshape(s.nframes, -1)
    return key if s.box is None else np.concatenate([key, s.box.reshape(s.nframes, 9)], axis=1)


def _labels_agree(a: System, i: int, b: System, j: int, tol: float) -> bool:
    if (a.energy is None) != (b.energy is None) or (a.force is None) != (b.force is None):
        return False
    if a.energy is not None and abs(a.energy[i] - b.energy[j]) / a.natoms > tol:
        return False
    if a.force is not None and np.abs(a.force[i] - b.force[j]).max() > tol:
        return False
    if a.virial is not None and b.virial is not None and np.abs(a.virial[i] - b.virial[j]).max() / a.natoms > tol:
        return False
    return True


def find_duplicates(sources: list[Source], keep: list[np.ndarray], tol: float, label_tol: float
                    ) -> tuple[list[Drop], list[dict]]:
    """Duplicates among kept frames (later ones dropped) and `similar` pairs (same structure,
    different labels). Systems are compared when their atoms are the same, in the same order."""
    groups: dict[tuple, list[int]] = {}
    for n, src in enumerate(sources):
        s = src.system
        groups.setdefault((s.natoms, tuple(s.elements[t] for t in s.atype), s.box is None), []).append(n)
    drops, similar = [], []
    for members in groups.values():
        rows = [(n, k) for n in members for k in np.nonzero(keep[n])[0]]  # global order: system, frame
        if len(rows) < 2:
            continue
        keys = np.concatenate([structure_keys(sources[n].system.subset(np.nonzero(keep[n])[0])) for n in members])
        pairs = cKDTree(keys).query_pairs(tol, p=np.inf, output_type="ndarray")
        pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]  # by the later frame, then the earlier
        gone: set[int] = set()
        for a, b in pairs:
            if b in gone or a in gone:
                continue
            (na, ka), (nb, kb) = rows[a], rows[b]
            sa, sb = sources[na].system, sources[nb].system
            dr = float(np.abs(keys[a] - keys[b]).max())
            if _labels_agree(sa, ka, sb, kb, label_tol):
                gone.add(b)
                reason = "duplicate" if dr == 0.0 else "near_duplicate"
                drops.append(Drop(sources[nb].name, int(kb), reason, dr, f"of {sources[na].name} frame {ka}"))
            else:
                similar.append({"system": sources[nb].name, "frame": int(kb), "of_system": sources[na].name,
                                "of_frame": int(ka), "max_dr": dr})
    return drops, similar


def apply_rules(sources: list[Source], cfg: RuleConfig, ntypes: int) -> tuple[list[np.ndarray], list[Drop], dict]:
    """Keep masks per system, the drops, and per-frame diagnostics for the plots."""
    keep = [np.ones(src.system.nframes, dtype=bool) for src in sources]
    drops: list[Drop] = []
    diag: dict = {"max_force": [], "energy_z": [], "similar": [], "notes": []}

    def drop(n, k, reason, value, detail=""):
        keep[n][k] = False
        drops.append(Drop(sources[n].name, int(k), reason, float(value), detail))

    for n, src in enumerate(sources):
        s = src.system
        for k, vol in src.singular.items():
            drop(n, k, "singular_cell", vol, "the cell vectors are (nearly) linearly dependent")
        for k, key in non_finite(s):
            if not keep[n][k]:
                continue
            drop(n, k, "non_finite", float("nan"), f"{key} contains {'NaN' if np.isnan(getattr(s, key)[k]).any() else 'inf'}")
        if s.force is not None:
            fmax = np.where(keep[n], max_atomic_force(s), np.nan)  # [nf]
            diag["max_force"].append(fmax[keep[n]])
            for k in np.nonzero(keep[n] & (fmax > cfg.max_force))[0]:
                drop(n, k, "max_force", fmax[k], f"limit {cfg.max_force} eV/A")
        if cfg.min_distance > 0:
            for k in np.nonzero(keep[n])[0]:
                d = min_distance(s, int(k), cfg.min_distance)
                if d < cfg.min_distance:
                    drop(n, k, "min_distance", d, f"limit {cfg.min_distance} A")
    for g in sorted({src.group for src in sources}):
        members = [n for n, src in enumerate(sources) if src.group == g]
        z = energy_zscores([sources[n].system for n in members], [keep[n] for n in members], ntypes,
                           cfg.energy_outlier_z, cfg.energy_outlier_floor)
        if z is None:
            diag["notes"].append(f"energy outliers not checked for {sources[members[0]].path}: too few frames")
            continue
        for n, zn in zip(members, z):
            diag["energy_z"].append(zn[keep[n]])
            for k in np.nonzero(keep[n] & (np.abs(np.nan_to_num(zn)) > cfg.energy_outlier_z))[0]:
                drop(n, k, "energy_outlier", zn[k], f"limit |z| {cfg.energy_outlier_z}")
    dups, diag["similar"] = find_duplicates(sources, keep, cfg.duplicate_tol, cfg.duplicate_label_tol)
    for d in dups:
        n = next(i for i, src in enumerate(sources) if src.name == d.system)
        keep[n][d.frame] = False
        drops.append(d)
    return keep, drops, diag

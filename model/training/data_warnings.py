"""Data that train and test can use but probably should not: one warning per dataset, and the
checks `lamflow validate` runs on a bounded sample of the data.

`warn_suspicious(systems, what, log)` looks, on at most MAX_FRAMES frames (evenly spaced over the
systems), for what `lamflow clean` would drop, with the cleaner's own detectors and defaults
(lamflow.model.tasks.clean): exact duplicate frames, an atomic force above `max_force`, and an energy
per atom far from the per-element fit of its system (robust z above `energy_outlier_z`). It
prints one line for the dataset, with the count and the first frame of each kind, and goes on:
such frames may be legitimate.

`sel_overflow(systems, descriptor, type_map)` finds, on a bounded sample, the first frame whose
neighbour counts exceed the descriptor's `sel`, and the sel it would need.

`refuse_non_finite(metrics, per, source)` refuses evaluation results holding NaN/inf, naming the
first system and frame.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from lamflow.model.data.batch import auto_sel
from lamflow.model.data.checks import RuleConfig, Source, energy_zscores, find_duplicates, max_atomic_force
from lamflow.model.data.neighbor import find_pairs, neighbor_counts
from lamflow.model.data.systems import System
from lamflow.model.errors import DataError
from lamflow.model.nn.config import DESCRIPTOR_CONFIGS, ModelConfig
from lamflow.model.nn.descriptor_config import DPA2Config, SeAttenConfig, SeE2AConfig
from lamflow.model.training.stats import resolve_sel

MAX_FRAMES = 2000  # frames looked at per dataset (issue 9: checks scale with a sample, not the data)


def sample_frames(systems: list[System], max_frames: int = MAX_FRAMES) -> list[np.ndarray]:
    """Frame indices per system: all of them when the data are small, else evenly spaced, each
    system getting its share of `max_frames` (at least one frame)."""
    total = sum(s.nframes for s in systems)
    if total <= max_frames:
        return [np.arange(s.nframes) for s in systems]
    out = []
    for s in systems:
        n = max(1, int(round(max_frames * s.nframes / total)))
        out.append(np.unique(np.linspace(0, s.nframes - 1, n).round().astype(np.int64)))
    return out


def _sampled(systems: list[System], idx: list[np.ndarray]) -> list[System]:
    """The sampled frames of each system, in memory (systems may be memory-mapped)."""
    out = []
    for s, i in zip(systems, idx):
        sub = s.subset(i)
        out.append(sub.materialize() if hasattr(sub, "materialize") else sub)
    return out


def suspicious_frames(systems: list[System], max_frames: int = MAX_FRAMES) -> dict[str, list[tuple[str, int]]]:
    """kind -> [(system name, frame)] found on the sample, with the detectors of lamflow clean (data/checks.py)."""
    cfg = RuleConfig()
    idx = sample_frames(systems, max_frames)
    sub = _sampled(systems, idx)
    found: dict[str, list[tuple[str, int]]] = {"duplicate": [], "max_force": [], "energy_outlier": []}
    ok = [np.all(np.isfinite(s.coord.reshape(s.nframes, -1)), axis=1) for s in sub]
    for s, i, m in zip(sub, idx, ok):
        if s.force is not None:
            big = np.nonzero(m & (max_atomic_force(s) > cfg.max_force))[0]
            found["max_force"] += [(s.name, int(i[k])) for k in big]
        if s.energy is not None:
            # one fit per system: systems of one dataset may come from different energy references
            z = energy_zscores([s], [m & np.isfinite(s.energy)], len(s.elements), cfg.energy_outlier_z,
                               cfg.energy_outlier_floor)
            if z is not None:
                far = np.nonzero(np.abs(np.nan_to_num(z[0])) > cfg.energy_outlier_z)[0]
                found["energy_outlier"] += [(s.name, int(i[k])) for k in far]
    sources = [Source(s.name, s.name, n, s) for n, s in enumerate(sub)]
    drops, _ = find_duplicates(sources, ok, 0.0, cfg.duplicate_label_tol)
    names = [s.name for s in sub]
    found["duplicate"] = sorted((d.system, int(idx[names.index(d.system)][d.frame])) for d in drops
                                if d.reason == "duplicate")
    return found


WHAT = {"duplicate": "exact duplicate frame(s)", "max_force": "frame(s) with an atomic force above {max_force:g} eV/A",
        "energy_outlier": "energy outlier(s) (|z| > {energy_outlier_z:g} from the per-element fit)"}


def warn_suspicious(systems: list[System], what: str, log: Callable = print, max_frames: int = MAX_FRAMES) -> str | None:
    """One warning line for the dataset (None when nothing was found); `what` names it."""
    if not systems:
        return None
    found = suspicious_frames(systems, max_frames)
    parts = []
    defaults = RuleConfig().model_dump()
    for kind, hits in found.items():
        if hits:
            name, k = hits[0]
            parts.append(f"{len(hits)} {WHAT[kind].format(**defaults)} (first: {name} frame {k})")
    if not parts:
        return None
    nf = sum(s.nframes for s in systems)
    scope = f" in a sample of {max_frames} of {nf} frames" if nf > max_frames else ""
    line = f"warning: {what} data: {'; '.join(parts)}{scope}; `lamflow clean` drops such frames"
    log(line)
    return line


# ----------------------------------------------------------------------------- sel


def sel_requests(descriptor: dict, ntypes: int) -> list[tuple[str, float, list[int] | None, int | None]]:
    """(key, rcut, per-type sel or None, total sel or None) of each neighbour list the descriptor
    builds; "auto" sels are left out (they are computed from the data)."""
    t = descriptor.get("type", "se_e2_a")
    out = []

    def fixed(v):
        return v is not None and not isinstance(v, str)

    family = DESCRIPTOR_CONFIGS.get(t)
    if family is SeE2AConfig:
        sel = descriptor.get("sel", "auto")
        if fixed(sel):
            out.append(("sel", float(descriptor.get("rcut", 6.0)), list(sel) if isinstance(sel, list) else None,
                        None if isinstance(sel, list) else int(sel)))
    elif family is SeAttenConfig:
        sel = descriptor.get("sel", "auto")
        if fixed(sel):
            out.append(("sel", float(descriptor.get("rcut", 6.0)), None, int(sum(sel) if isinstance(sel, list) else sel)))
    elif family is DPA2Config:
        for block in ("repinit", "repformer"):
            b = descriptor.get(block) or {}
            if fixed(b.get("nsel", "auto")) and "rcut" in b:
                out.append((f"{block}.nsel", float(b["rcut"]), None, int(b["nsel"])))
    return out


def resolved_descriptor(descriptor: dict, type_map: list[str], systems: list[System],
                        max_frames: int = MAX_FRAMES) -> dict | None:
    """The descriptor with "auto" sels replaced as training would replace them (from these
    systems' neighbour counts), or None when the systems hold more than `max_frames` frames (a
    sample would only give a lower bound of the sel training computes)."""
    if sum(s.nframes for s in systems) > max_frames:
        return None
    desc = ModelConfig.model_validate({"type_map": list(type_map), "descriptor": descriptor}).descriptor
    return resolve_sel(desc, systems, len(type_map)).model_dump(mode="json")


def sel_overflow(systems: list[System], descriptor: dict, type_map: list[str], max_frames: int = MAX_FRAMES
                 ) -> str | None:
    """The first sampled frame whose neighbours do not fit the descriptor's sel, as one message
    naming system, frame and the sel needed (from the whole sample); None when all fit."""
    reqs = sel_requests(descriptor, len(type_map))
    if not reqs:
        return None
    ntypes = len(type_map)
    idx = sample_frames(systems, max_frames)
    sub = _sampled(systems, idx)
    for key, rcut, per_type, total in reqs:
        if per_type is not None and len(per_type) != ntypes:
            continue  # a config error (one sel per element), reported by the config's own check
        first = None
        need_t = np.zeros(ntypes, dtype=np.int64)
        need_total = 0
        for s, frames in zip(sub, idx):
            for j, k in enumerate(frames):
                c = neighbor_counts(find_pairs(s.coord[j], None if s.box is None else s.box[j], rcut), s.atype,
                                    s.natoms, ntypes, rcut)  # [natoms, ntypes]
                mt, mtot = c.max(axis=0), int(c.sum(axis=1).max())
                need_t, need_total = np.maximum(need_t, mt), max(need_total, mtot)
                over = (per_type is not None and bool((mt > np.asarray(per_type)).any())) or \
                       (total is not None and mtot > total)
                if over and first is None:
                    first = (s.name, int(k), mt.tolist(), mtot)
        if first is not None:
            name, k, mt, mtot = first
            have = per_type if per_type is not None else total
            got = f"{mt} neighbours per type" if per_type is not None else f"{mtot} neighbours"
            need = auto_sel(need_t) if per_type is not None else int(math.ceil(need_total * 1.1 / 4) * 4)
            return (f"{name} frame {k}: an atom has {got} within rcut {rcut:g} but {key} is {have}; "
                    f"the sampled frames need {key}: {need}")
    return None


# ----------------------------------------------------------------------------- evaluation


def refuse_non_finite(metrics: dict, per: list[tuple[System, dict]], source: str) -> None:
    """A NaN/inf error metric is not a result: refuse it, naming the first system and frame whose
    prediction is not finite."""
    bad = [k for k, v in (metrics.get("overall") or {}).items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return
    for s, p in per:
        for key in ("energy", "force", "virial"):
            a = p.get(key)
            if a is None:
                continue
            a = np.asarray(a).reshape(s.nframes, -1)
            rows = np.nonzero(~np.isfinite(a).all(axis=1))[0]
            if len(rows):
                raise DataError(f"{source}: {s.name} frame {int(rows[0])}: the model predicts a non-finite {key} "
                                f"({len(rows)} frame(s)); {', '.join(bad)} would be NaN, nothing written")
    raise DataError(f"{source}: {', '.join(bad)} is not finite; nothing written")

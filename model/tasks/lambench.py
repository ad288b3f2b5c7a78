"""What LAMBench measures of a force field, for one model on one downstream system:

- accuracy, normalised: each E/F/V RMSE divided by the composition-only "dummy" model's
  (lamflow.model.tasks.baseline); a ratio >= 1 means the model learned nothing beyond counting atoms;
- stability: NVE molecular dynamics from a few structures of the data (lamflow.model.tasks.md); the
  energy drift |slope of E_tot(t)| per atom in eV/atom/ps against LAMBench's tolerance of
  5e-4 eV/atom/ps; a run that fails (non-finite energy, or one of md's stop conditions) counts
  as unstable;
- efficiency: microseconds per atom per energy+force evaluation on the system grown to ~1000
  atoms (a periodic cell replicated; molecules copied on a grid further apart than rcut), as a
  production MD would run it.

    grow(system, 1000, rcut)       -> (coord [natoms, 3], box [3, 3] | None, atype [natoms])
    efficiency(model, systems)     -> {"us_per_atom": ..., "natoms": ..., "per_system": {...}}
    stability(model, systems)      -> {"stable_fraction": ..., "runs": [...], ...}
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from lamflow.model.data.batch import collate
from lamflow.model.data.systems import System
from lamflow.model.errors import LamflowError
from lamflow.model.nn.infer import _graph, evaluate
from lamflow.model.nn.potential import predict
from lamflow.model.tasks import md  # md.run_md looked up at call time (tests replace it)
from lamflow.model.tasks.calculator import LamflowCalculator

DRIFT_TOLERANCE = 5e-4  # eV/atom/ps, LAMBench's NVE stability threshold


# ----------------------------------------------------------------------------- bigger cells


def replicas(natoms: int, target: int) -> int:
    """Copies of a natoms structure needed for >= target atoms."""
    return max(1, math.ceil(target / max(1, natoms)))


def grow(s: System, target: int, rcut: float, frame: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Frame `frame` of `s` repeated to >= target atoms. Periodic: the cell replicated n1 x n2 x n3
    (the smallest near-cubic product >= the copies needed). Non-periodic: copies of the molecule
    on a cubic grid, spaced by its extent + rcut so they do not interact (still no cell)."""
    need = replicas(s.natoms, target)
    x = np.asarray(s.coord[frame], dtype=np.float64)  # [natoms, 3]
    if s.box is not None:
        box = np.asarray(s.box[frame], dtype=np.float64)
        reps = _near_cubic(need, np.linalg.norm(box, axis=1))
        shifts = np.array([(i, j, k) for i in range(reps[0]) for j in range(reps[1]) for k in range(reps[2])]) @ box
        coord = (shifts[:, None, :] + x[None]).reshape(-1, 3)
        return coord, box * np.array(reps)[:, None], np.tile(s.atype, len(shifts))
    side = math.ceil(need ** (1 / 3) - 1e-9)
    step = float(np.ptp(x, axis=0).max()) + rcut + 1.0
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)][:need], dtype=np.float64)
    coord = (grid[:, None, :] * step + x[None]).reshape(-1, 3)
    return coord, None, np.tile(s.atype, len(grid))


def _near_cubic(need: int, lengths: np.ndarray) -> tuple[int, int, int]:
    """Replication counts with product >= need that make the supercell's edges about equal."""
    best = None
    for n1 in range(1, need + 1):
        for n2 in range(1, need // n1 + 2):
            n3 = max(1, math.ceil(need / (n1 * n2)))
            edges = lengths * (n1, n2, n3)
            key = (n1 * n2 * n3, float(edges.max() / edges.min()))
            if best is None or key < best[0]:
                best = (key, (n1, n2, n3))
    return best[1]


# ----------------------------------------------------------------------------- efficiency


def time_evaluation(model, coord: np.ndarray, box: np.ndarray | None, atype: np.ndarray, repeats: int = 3) -> float:
    """Best wall time (s) of one energy+force evaluation (neighbour list included) after a warm-up."""

    def once() -> float:
        t0 = time.perf_counter()
        evaluate(model, coord, box, atype, virial=False)
        return time.perf_counter() - t0

    once()
    return min(once() for _ in range(repeats))


def efficiency(model, systems: list[System], natoms: int = 1000, repeats: int = 3) -> dict:
    """Microseconds per atom per evaluation on each system's first frame grown to ~natoms atoms;
    the headline is the mean over systems."""
    rcut = float(model.cfg.descriptor.rcut) if hasattr(model.cfg, "descriptor") else float(model.cfg.model.descriptor.rcut)
    per = {}
    for s in systems:
        coord, box, atype = grow(s, natoms, rcut)
        t = time_evaluation(model, coord, box, atype, repeats)
        per[s.name] = {"natoms": int(len(atype)), "seconds": t, "us_per_atom": 1e6 * t / len(atype)}
    vals = [v["us_per_atom"] for v in per.values()]
    return {"us_per_atom": float(np.mean(vals)) if vals else None,
            "natoms": int(np.mean([v["natoms"] for v in per.values()])) if per else 0, "per_system": per}


def speedup(model, other, s: System, natoms: int = 1000, repeats: int = 7) -> dict:
    """Wall time of `model` vs `other` (e.g. its compressed form) on the first frame of `s` grown
    to >= natoms atoms, two ways: the model evaluation (energy + forces from the coordinates, on a
    neighbour list built once and handed to both, as LAMMPS reuses its list between rebuilds):
    `speedup`; and the whole `infer.evaluate` call, neighbour list (numpy, the same code for both)
    included: `speedup_with_nlist`. Calls alternate between the two models, so a busy machine
    slows both alike; the best call of each counts, the median of the per-round ratios is kept too."""

    rcut = float(model.cfg.descriptor.rcut)
    coord, box, atype = grow(s, natoms, rcut)
    frame = System("grown", list(model.type_map), atype, coord[None], None if box is None else box[None])
    graph = _graph(model, coord, box, atype)  # both models ask for the same list (same rcut and sel)
    batches = {m: collate([(frame, 0, graph)], m.dtype).to(m.out_bias.device) for m in (model, other)}

    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    def alone(m) -> float:
        return timed(lambda: predict(m, batches[m], forces=True).force.cpu())

    def full(m) -> float:
        return timed(lambda: evaluate(m, coord, box, atype, virial=False))

    for m in (model, other, model, other):  # warm-up
        alone(m), full(m)
    a = np.array([(alone(model), alone(other)) for _ in range(repeats)])  # [repeats, 2]
    f = np.array([(full(model), full(other)) for _ in range(repeats)])
    ratio = lambda t: float(t[:, 0].min() / t[:, 1].min())  # noqa: E731
    return {"natoms": int(len(atype)), "seconds_model": float(a[:, 0].min()), "seconds_compressed": float(a[:, 1].min()),
            "speedup": ratio(a), "speedup_median": float(np.median(a[:, 0] / a[:, 1])),
            "seconds_model_with_nlist": float(f[:, 0].min()), "seconds_compressed_with_nlist": float(f[:, 1].min()),
            "speedup_with_nlist": ratio(f), "timing": "model evaluation on a shared neighbour list (speedup); "
                                                      "whole evaluate call, neighbour list included (speedup_with_nlist)"}


# ----------------------------------------------------------------------------- stability


def pick_frames(systems: list[System], n: int, seed: int = 0) -> list[tuple[System, int]]:
    """n (system, frame) pairs spread over the systems, frames drawn without replacement."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        s = systems[k % len(systems)]
        taken = [f for t, f in out if t is s]
        free = [f for f in range(s.nframes) if f not in taken] or list(range(s.nframes))
        out.append((s, int(rng.choice(free))))
    return out


def stability(model, systems: list[System], *, structures: int = 3, steps: int = 200, timestep: float = 0.5,
              temperature: float = 300.0, tolerance: float = DRIFT_TOLERANCE, seed: int = 0,
              log: Callable = print) -> dict:
    """NVE runs from `structures` frames of the data; |drift| per run in eV/atom/ps. A run is
    stable when it finishes with finite energies and |drift| <= tolerance; failed runs are
    unstable (their error is kept)."""

    calc = LamflowCalculator(model, device=str(model.out_bias.device))
    runs = []
    for i, (s, frame) in enumerate(pick_frames(systems, structures, seed)):
        run = {"system": s.name, "frame": frame, "natoms": s.natoms}
        try:
            res = md.run_md(md.system_to_atoms(s, frame), calc, ensemble="nve", temperature=temperature, steps=steps,
                         timestep=timestep, interval=max(1, steps), seed=seed + i, log=lambda *a: None)
            drift = abs(res.energy_drift_eV_per_atom_per_ps)
            ok = math.isfinite(drift)
            run.update(drift=drift if ok else None, max_dev=res.max_energy_deviation_eV_per_atom,
                       mean_T=res.mean_temperature_K, stable=bool(ok and drift <= tolerance))
            if not ok:
                run["error"] = "non-finite energy drift"
        except (LamflowError, FloatingPointError, RuntimeError) as err:  # md's stop conditions, a blown-up run
            run.update(drift=None, stable=False, error=str(err).splitlines()[0][:200])
        runs.append(run)
        log(f"nve {s.name} frame {frame}: " + (f"drift {run['drift']:.2e} eV/atom/ps" if run.get("drift") is not None
                                               else f"failed ({run.get('error')})"))
    drifts = [r["drift"] for r in runs if r.get("drift") is not None]
    nstable = sum(r["stable"] for r in runs)
    return {"tolerance": tolerance, "steps": steps, "timestep_fs": timestep, "temperature_K": temperature,
            "runs": runs, "stable": nstable, "total": len(runs),
            "stable_fraction": nstable / len(runs) if runs else None,
            "median_drift": float(np.median(drifts)) if drifts else None,
            "max_drift": float(np.max(drifts)) if len(drifts) == len(runs) and drifts else None}

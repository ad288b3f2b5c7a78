"""Molecular dynamics with a lamflow model through ASE: NVT (Langevin) or NVE (velocity Verlet).

Energy conservation check (NVE): the total energy E_tot = E_pot + E_kin is recorded at every step
and its drift reported as the least-squares slope of E_tot(t) per atom, in eV/atom/ps, next to
the largest deviation |E_tot(t) - E_tot(0)| per atom. For Langevin dynamics E_tot is not
conserved; the same numbers are reported but mean nothing about the integrator.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from .checkpoint import atomic_write_text
from .errors import DataError, LamflowError


class SimulationError(LamflowError):
    """MD cannot go on: `step 120: potential energy is nan (the model left its training domain?)`."""


# ----------------------------------------------------------------------------- structures


def system_to_atoms(s, frame: int = 0):
    """Frame `frame` of a lamflow System as ase.Atoms."""
    from ase import Atoms

    if not -s.nframes <= frame < s.nframes:
        raise DataError(f"{s.name}: frame {frame} out of range (it has {s.nframes} frames)")
    symbols = [s.elements[t] for t in s.atype]
    if s.box is None:
        return Atoms(symbols, positions=s.coord[frame], pbc=False)
    return Atoms(symbols, positions=s.coord[frame], cell=s.box[frame], pbc=True)


def read_structure(path: str | os.PathLike, frame: int = 0, fmt: str = "auto"):
    """One frame as ase.Atoms: a deepmd system folder (npy/raw; `fmt` may name another dpdata
    format) or any file ase.io.read understands (xyz, extxyz, POSCAR, cif, ...)."""
    from .data import elements_in, find_systems, load_systems

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir() or fmt != "auto":
        if p.is_dir():
            found = find_systems(p)
            if len(found) != 1:
                raise DataError(f"{p}: holds {len(found)} systems; give one system folder")
        elements = elements_in(str(p), fmt)
        systems = load_systems(str(p), elements, fmt, labeled=False)
        if len(systems) != 1:
            raise DataError(f"{p}: holds {len(systems)} systems; give one")
        return system_to_atoms(systems[0], frame)
    import ase.io

    try:
        return ase.io.read(str(p), index=frame)
    except IndexError:
        raise DataError(f"{p}: frame {frame} out of range") from None
    except Exception as e:  # any parser error of any ASE format
        raise DataError(f"{p}: ASE cannot read it: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- MD


@dataclass
class MDResult:
    ensemble: str
    natoms: int
    steps: int
    timestep_fs: float
    temperature_K: float  # target (NVT) or initial (NVE)
    mean_temperature_K: float
    energy_drift_eV_per_atom_per_ps: float  # slope of E_tot(t) / natoms
    max_energy_deviation_eV_per_atom: float  # max |E_tot(t) - E_tot(0)| / natoms
    wall_s: float
    steps_per_s: float
    trajectory: str | None = None
    summary: str | None = None
    time_ps: list[float] = field(default_factory=list, repr=False)  # every step
    total_energy: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("time_ps")
        d.pop("total_energy")
        return d


def run_md(atoms, calc, *, ensemble: Literal["nvt", "nve"] = "nvt", temperature: float = 300.0, steps: int = 1000,
           timestep: float = 1.0, friction: float = 0.01, interval: int = 10, traj: str | os.PathLike | None = None,
           summary: str | os.PathLike | None = None, seed: int | None = None,
           on_sample: Callable[[int, object], None] | None = None, log: Callable = print) -> MDResult:
    """Run `steps` steps of `timestep` fs from `atoms` (velocities drawn at `temperature` K).
    NVT: Langevin with `friction` in 1/fs. Every `interval` steps: a progress line, a frame
    appended to `traj` (extxyz, written as TRAJ.part and renamed at the end) and
    `on_sample(step, atoms)`. `summary`: JSON with the numbers of the returned MDResult."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    if ensemble not in ("nvt", "nve"):
        raise DataError(f"ensemble must be 'nvt' or 'nve', got {ensemble!r}")
    if steps < 0 or timestep <= 0 or interval <= 0 or temperature < 0 or friction < 0:
        raise DataError(f"need steps >= 0, timestep > 0, interval > 0, temperature >= 0, friction >= 0 "
                        f"(got {steps}, {timestep}, {interval}, {temperature}, {friction})")
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.calc = calc
    if temperature > 0:
        thermalize_momenta(atoms, temperature, rng=rng)  # Maxwell-Boltzmann
        Stationary(atoms)
        if not atoms.pbc.any():
            ZeroRotation(atoms)
    dt = timestep * units.fs
    if ensemble == "nvt":  # the centre of mass held by a constraint, as ASE >= 3.28 recommends over fixcm
        atoms.set_constraint(list(atoms.constraints) + [FixCom()])
        dyn = Langevin(atoms, timestep=dt, temperature_K=temperature, friction=friction / units.fs, fixcm=False, rng=rng)
    else:
        dyn = VelocityVerlet(atoms, timestep=dt)
    n = len(atoms)
    times, etot, temps = [], [], []
    fh = None
    part = None
    if traj is not None:
        traj = Path(traj)
        traj.parent.mkdir(parents=True, exist_ok=True)
        part = traj.with_name(traj.name + ".part")
        fh = open(part, "w")
    t0 = time.perf_counter()

    def record():
        step = dyn.nsteps
        epot = atoms.get_potential_energy()
        ekin = atoms.get_kinetic_energy()
        if not np.isfinite(epot):
            raise SimulationError(f"step {step}: potential energy is {epot} (the model left its training domain?)")
        times.append(step * timestep / 1000.0)
        etot.append(epot + ekin)
        temps.append(atoms.get_temperature())
        if step % interval == 0 or step == steps:
            if fh is not None:
                import ase.io

                ase.io.write(fh, atoms, format="extxyz")
                fh.flush()
            if on_sample is not None:
                on_sample(step, atoms)
            el = time.perf_counter() - t0
            rate = step / el if el > 0 and step else float("nan")
            eta = (steps - step) / rate if rate == rate and rate > 0 else float("nan")
            log(f"step {step:>7d}/{steps}  t {step * timestep / 1000:.4f} ps  Epot {epot:.6f}  Ekin {ekin:.6f}  "
                f"Etot {epot + ekin:.6f} eV  T {temps[-1]:.1f} K  {rate:.1f} steps/s  ETA {eta:.0f} s")

    try:
        dyn.attach(record, interval=1)  # ASE calls it at step 0 too
        dyn.run(steps)
    finally:
        if fh is not None:
            fh.close()
    wall = time.perf_counter() - t0
    if part is not None:
        os.replace(part, traj)
    t, e = np.array(times), np.array(etot)
    slope = float(np.polyfit(t, e, 1)[0]) if len(t) > 1 else 0.0
    res = MDResult(
        ensemble=ensemble, natoms=n, steps=steps, timestep_fs=timestep, temperature_K=temperature,
        mean_temperature_K=float(np.mean(temps)), energy_drift_eV_per_atom_per_ps=slope / n,
        max_energy_deviation_eV_per_atom=float(np.max(np.abs(e - e[0])) / n), wall_s=wall,
        steps_per_s=steps / wall if wall > 0 else float("nan"), trajectory=None if traj is None else str(traj),
        summary=None if summary is None else str(summary), time_ps=t.tolist(), total_energy=e.tolist(),
    )
    if summary is not None:
        atomic_write_text(summary, json.dumps(res.to_json(), indent=2))
    log(f"{ensemble}: {steps} steps in {wall:.1f} s; energy drift {res.energy_drift_eV_per_atom_per_ps:.3e} eV/atom/ps, "
        f"max |Etot - Etot(0)| {res.max_energy_deviation_eV_per_atom:.3e} eV/atom, mean T {res.mean_temperature_K:.1f} K")
    return res

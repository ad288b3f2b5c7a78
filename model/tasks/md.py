"""Molecular dynamics with a lamflow model through ASE: NVT (Langevin) or NVE (velocity Verlet).

Energy conservation check (NVE): the total energy E_tot = E_pot + E_kin is recorded at every step
and its drift reported as the least-squares slope of E_tot(t) per atom, in eV/atom/ps, next to
the largest deviation |E_tot(t) - E_tot(0)| per atom. For Langevin dynamics E_tot is not
conserved; the same numbers are reported but mean nothing about the integrator.

Guards (`MDGuards`): a model outside its training domain can heat a system to 10^6 K or push two
atoms 0.1 A apart while the run carries on. After every step the run stops, with
`MDResult.status` saying why and at which step, when
    non_finite           E_pot is not a finite number
    close_contact        two atoms are closer than min_distance: 0.9 x the min_nbor_dist of the
                         model's training data stored in the checkpoint, else 0.5 A
    temperature_runaway  the temperature, averaged over the last 20 steps, exceeds max_temperature:
                         5 x the target (NVT) or initial (NVE) temperature, at least 1000 K (the
                         instantaneous temperature of a small system swings by ~sqrt(2 / 3N) of
                         itself, and a relaxing start structure heats it for a while; a runaway lasts)
    energy_drift         (NVE) |E_tot(t) - E_tot(0)| / natoms exceeds max_energy_drift, 0.01 eV/atom
(checked in this order). A run that went to the end has status "completed". A compressed model
whose neighbour inputs leave its tables (it extrapolates linearly there) is reported once, with
the count, and counted in the result; it does not stop the run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from lamflow.model.data.neighbor import find_pairs
from lamflow.model.data.systems import elements_in, find_systems, load_systems
from lamflow.model.errors import DataError, LamflowError
from lamflow.model.io.files import atomic_write_text


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


# ----------------------------------------------------------------------------- guards

MIN_DISTANCE_FALLBACK = 0.5  # Angstrom: close-contact bound when the training data's min_nbor_dist is unknown
MIN_DISTANCE_FRACTION = 0.9  # of min_nbor_dist
TEMPERATURE_FACTOR = 5.0  # x the target / initial temperature
TEMPERATURE_FLOOR = 1000.0  # K, the least max_temperature (a 0 K start may heat up as it relaxes)
TEMPERATURE_WINDOW = 20  # steps the runaway test averages the temperature over
ENERGY_DRIFT = 0.01  # eV/atom, NVE: max |E_tot(t) - E_tot(0)| / natoms

STATUSES = ("completed", "non_finite", "close_contact", "temperature_runaway", "energy_drift")


@dataclass(frozen=True)
class MDGuards:
    """Bounds that stop a run (module docstring). None: the default; math.inf (temperature, drift)
    or 0 (distance) switches a guard off."""

    max_temperature: float | None = None  # K
    min_distance: float | None = None  # Angstrom
    max_energy_drift: float | None = None  # eV/atom, NVE only

    def resolve(self, temperature: float, min_nbor_dist: float | None) -> dict:
        """The bounds a run uses, with where each came from (they go into the result JSON)."""
        if self.max_temperature is not None:
            t_max, t_src = float(self.max_temperature), "given"
        else:
            t_max = max(TEMPERATURE_FACTOR * temperature, TEMPERATURE_FLOOR)
            t_src = f"max({TEMPERATURE_FACTOR:g} x {temperature:g} K, {TEMPERATURE_FLOOR:g} K)"
        if self.min_distance is not None:
            d_min, d_src = float(self.min_distance), "given"
        elif min_nbor_dist:
            d_min, d_src = MIN_DISTANCE_FRACTION * float(min_nbor_dist), f"{MIN_DISTANCE_FRACTION:g} x min_nbor_dist {min_nbor_dist:.4g} A"
        else:
            d_min, d_src = MIN_DISTANCE_FALLBACK, "fallback (min_nbor_dist of the training data unknown)"
        drift = float(self.max_energy_drift) if self.max_energy_drift is not None else ENERGY_DRIFT
        return {"max_temperature_K": t_max, "max_temperature_from": t_src, "min_distance_A": d_min, "min_distance_from": d_src,
                "max_energy_drift_eV_per_atom": drift}


def closest_pair(atoms, radius: float) -> float | None:
    """The smallest interatomic distance below `radius` (A; periodic images included), None if none."""

    if len(atoms) < 2 or radius <= 0:
        return None
    box = np.asarray(atoms.cell.array, dtype=np.float64) if atoms.pbc.all() else None
    d = find_pairs(np.asarray(atoms.positions, dtype=np.float64), box, radius).d
    return float(d.min()) if len(d) else None


# ----------------------------------------------------------------------------- MD


@dataclass
class MDResult:
    """How a run went. `status` is one of STATUSES; when it is not "completed", `stopped_at_step`
    is the step whose state broke a bound and `message` says so in one line. The energy and
    temperature figures cover the steps that ran (0 .. stopped_at_step)."""

    ensemble: str
    natoms: int
    steps: int  # requested
    timestep_fs: float
    temperature_K: float  # target (NVT) or initial (NVE)
    mean_temperature_K: float
    energy_drift_eV_per_atom_per_ps: float  # slope of E_tot(t) / natoms
    max_energy_deviation_eV_per_atom: float  # max |E_tot(t) - E_tot(0)| / natoms
    wall_s: float
    steps_per_s: float
    trajectory: str | None = None
    summary: str | None = None
    status: str = "completed"
    stopped_at_step: int | None = None
    message: str | None = None
    steps_done: int = 0
    max_temperature_seen_K: float = float("nan")
    min_distance_seen_A: float | None = None  # closest pair over the run (None: none within the search radius)
    out_of_table_inputs: int | None = None  # compressed models: neighbour inputs outside the tables (None: not compressed)
    limits: dict = field(default_factory=dict)  # the bounds used (MDGuards.resolve)
    time_ps: list[float] = field(default_factory=list, repr=False)  # every step
    total_energy: list[float] = field(default_factory=list, repr=False)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def to_json(self) -> dict:
        """The fields as strict JSON: no per-step lists; inf / nan (a guard switched off, no steps) become null."""
        d = asdict(self)
        d.pop("time_ps")
        d.pop("total_energy")
        finite = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v  # noqa: E731
        return {k: ({kk: finite(vv) for kk, vv in v.items()} if isinstance(v, dict) else finite(v)) for k, v in d.items()}


def run_md(atoms, calc, *, ensemble: Literal["nvt", "nve"] = "nvt", temperature: float = 300.0, steps: int = 1000,
           timestep: float = 1.0, friction: float = 0.01, interval: int = 10, traj: str | os.PathLike | None = None,
           summary: str | os.PathLike | None = None, seed: int | None = None, guards: MDGuards | None = None,
           on_sample: Callable[[int, object], None] | None = None, log: Callable = print) -> MDResult:
    """Run `steps` steps of `timestep` fs from `atoms` (velocities drawn at `temperature` K).
    NVT: Langevin with `friction` in 1/fs. Every `interval` steps: a progress line, a frame
    appended to `traj` (extxyz, written as TRAJ.part and renamed at the end) and
    `on_sample(step, atoms)`. `guards` (default MDGuards()) stop the run early; the offending
    frame is the trajectory's last. The result says how the run ended; run_md itself raises
    only for bad arguments. `summary`: JSON with the numbers of the returned MDResult."""
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
    limits = (guards or MDGuards()).resolve(temperature, getattr(calc, "min_nbor_dist", None))
    t_max, d_min, e_max = limits["max_temperature_K"], limits["min_distance_A"], limits["max_energy_drift_eV_per_atom"]
    radius = max(2 * d_min, 2.0)  # closest pairs are searched within this (A), so the minimum is known most of the time
    table_count = getattr(calc, "out_of_table_inputs", lambda: None)
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
    seen = {"dmin": None, "stop": None, "table0": table_count(), "table_warned": False}
    fh = None
    part = None
    if traj is not None:
        traj = Path(traj)
        traj.parent.mkdir(parents=True, exist_ok=True)
        part = traj.with_name(traj.name + ".part")
        fh = open(part, "w")
    t0 = time.perf_counter()

    def write_frame():
        if fh is not None:
            import ase.io

            ase.io.write(fh, atoms, format="extxyz")
            fh.flush()

    def check(step: int, epot: float, temp: float) -> tuple[str, str] | None:
        """(status, message) of the first bound this step breaks, or None."""
        if not np.isfinite(epot):
            return "non_finite", f"potential energy is {epot} (the model left its training domain?)"
        d = closest_pair(atoms, radius)
        if d is not None:
            seen["dmin"] = d if seen["dmin"] is None else min(seen["dmin"], d)
            if d < d_min:
                i, j = _closest_atoms(atoms, radius)
                return "close_contact", (f"atoms {i} ({atoms[i].symbol}) and {j} ({atoms[j].symbol}) are {d:.3f} A apart, "
                                         f"closer than {d_min:.3f} A ({limits['min_distance_from']})")
        recent = float(np.mean(temps[-TEMPERATURE_WINDOW:])) if temps else temp
        if recent > t_max:
            return "temperature_runaway", (f"temperature {recent:.0f} K (mean of the last {min(len(temps), TEMPERATURE_WINDOW)} "
                                           f"steps) exceeds {t_max:.0f} K ({limits['max_temperature_from']})")
        if ensemble == "nve" and len(etot) > 1:
            dev = abs(etot[-1] - etot[0]) / n
            if dev > e_max:
                return "energy_drift", f"|Etot - Etot(0)| is {dev:.3g} eV/atom, more than {e_max:.3g} eV/atom (NVE)"
        return None

    def record():
        step = dyn.nsteps
        epot = atoms.get_potential_energy()
        ekin = atoms.get_kinetic_energy()
        temp = atoms.get_temperature()
        if np.isfinite(epot):
            times.append(step * timestep / 1000.0)
            etot.append(epot + ekin)
            temps.append(temp)
        bad = check(step, epot, temp)
        extra = table_count()
        if extra is not None and extra > (seen["table0"] or 0) and not seen["table_warned"]:
            seen["table_warned"] = True
            log(f"warning: step {step}: {extra - seen['table0']} neighbour inputs of the compressed model outside its tables "
                f"(it extrapolates linearly; the structure left the range of the training data); the total goes in the summary")
        if bad is not None:
            seen["stop"] = (step, *bad)
            write_frame()
            log(f"step {step}: {bad[0]}: {bad[1]}")
            return
        if step % interval == 0 or step == steps:
            write_frame()
            if on_sample is not None:
                on_sample(step, atoms)
            el = time.perf_counter() - t0
            rate = step / el if el > 0 and step else float("nan")
            eta = (steps - step) / rate if rate == rate and rate > 0 else float("nan")
            log(f"step {step:>7d}/{steps}  t {step * timestep / 1000:.4f} ps  Epot {epot:.6f}  Ekin {ekin:.6f}  "
                f"Etot {epot + ekin:.6f} eV  T {temp:.1f} K  {rate:.1f} steps/s  ETA {eta:.0f} s")

    try:
        dyn.attach(record, interval=1)  # ASE calls it at step 0 too
        for _ in dyn.irun(steps):
            if seen["stop"] is not None:
                break
    finally:
        if fh is not None:
            fh.close()
    wall = time.perf_counter() - t0
    if part is not None:
        os.replace(part, traj)
    t, e = np.array(times), np.array(etot)
    slope = float(np.polyfit(t, e, 1)[0]) if len(t) > 1 else 0.0
    done = seen["stop"][0] if seen["stop"] else steps
    extra = table_count()
    res = MDResult(
        ensemble=ensemble, natoms=n, steps=steps, timestep_fs=timestep, temperature_K=temperature,
        mean_temperature_K=float(np.mean(temps)) if temps else float("nan"), energy_drift_eV_per_atom_per_ps=slope / n,
        max_energy_deviation_eV_per_atom=float(np.max(np.abs(e - e[0])) / n) if len(e) else float("nan"), wall_s=wall,
        steps_per_s=done / wall if wall > 0 else float("nan"), trajectory=None if traj is None else str(traj),
        summary=None if summary is None else str(summary), steps_done=done,
        max_temperature_seen_K=float(np.max(temps)) if temps else float("nan"), min_distance_seen_A=seen["dmin"],
        out_of_table_inputs=None if extra is None else extra - (seen["table0"] or 0), limits=limits,
        time_ps=t.tolist(), total_energy=e.tolist(),
    )
    if seen["stop"] is not None:
        res.stopped_at_step, res.status, res.message = seen["stop"]
    if summary is not None:
        atomic_write_text(summary, json.dumps(res.to_json(), indent=2, allow_nan=False))
    how = "completed" if res.completed else f"STOPPED at step {res.stopped_at_step} ({res.status})"
    log(f"{ensemble}: {done} of {steps} steps in {wall:.1f} s, {how}; energy drift {res.energy_drift_eV_per_atom_per_ps:.3e} "
        f"eV/atom/ps, max |Etot - Etot(0)| {res.max_energy_deviation_eV_per_atom:.3e} eV/atom, mean T {res.mean_temperature_K:.1f} K, "
        f"max T {res.max_temperature_seen_K:.1f} K" + ("" if res.min_distance_seen_A is None else f", closest pair {res.min_distance_seen_A:.3f} A")
        + ("" if not res.out_of_table_inputs else f", {res.out_of_table_inputs} inputs outside the compressed tables"))
    return res


def _closest_atoms(atoms, radius: float) -> tuple[int, int]:
    """Indices of the closest pair (for the close-contact message)."""

    box = np.asarray(atoms.cell.array, dtype=np.float64) if atoms.pbc.all() else None
    p = find_pairs(np.asarray(atoms.positions, dtype=np.float64), box, radius)
    k = int(np.argmin(p.d))
    return int(p.i[k]), int(p.mapping[p.j[k]])

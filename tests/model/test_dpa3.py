"""DPA-3: deepmd-kit 3.2.0 parity on five option sets, the physics contract for two more,
smoothness at the angle cutoff (and deepmd-kit's non-smooth default there), config checks,
sel: auto and statistics, the templates, and short single-task and multi-task (energy + denoise)
training runs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, data_path
from multitask_helpers import write_subset, write_yaml
from physics import PotentialContract

from lamflow.model.data.batch import max_neighbor_counts
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import ConfigError
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.descriptor.dpa3 import DPA3, from_deepmd_key
from lamflow.model.nn.descriptor_config import DPA3Config
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.schema import parse_config
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.trainer import build_energy_model, train

TEMPLATES = REPO / "templates"
DEEPMD_REFERENCE = Path(__file__).parents[1] / "data" / "dpa3_deepmd_3.2.0.npz"  # tests/data/make_dpa3_reference.py
SMALL = {"n_dim": 8, "e_dim": 6, "a_dim": 4, "nlayers": 2, "e_rcut": 4.0, "e_rcut_smth": 0.5, "e_sel": 40,
         "a_rcut": 3.0, "a_rcut_smth": 0.5, "a_sel": 20, "axis_neuron": 2}


def dpa3_model(type_map, dtype, repflow: dict, **top) -> EnergyModel:
    """Residual weights drawn at 0.3 (not the tiny init), a random data std where fix_stat_std is 0,
    and an energy bias, so that every update term and the normalisation are exercised."""
    prec = "float64" if dtype == torch.float64 else "float32"
    cfg = ModelConfig(type_map=type_map,
                      descriptor={"type": "dpa3", "repflow": {**SMALL, **repflow}, "precision": prec, "seed": 1, **top},
                      fitting_net={"neuron": [8, 8], "seed": 2, "precision": prec})
    model = EnergyModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        env = model.descriptor.repflows.env
        if not cfg.descriptor.repflow.std:
            s = 0.2 + torch.rand(env.stddev.shape[0], 1, 2, generator=g, dtype=torch.float64)  # radial, angular
            env.stddev.copy_(torch.cat([s[..., :1], s[..., 1:].expand(-1, -1, 3)], -1).expand(env.stddev.shape).to(env.stddev))
        model.out_bias.copy_(torch.tensor([-3.0, -1.0, -7.0]).to(model.out_bias))
        for name, p in model.named_parameters():
            if "_residual." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    return model


def test_dpa3_matches_deepmd_kit_descriptor_and_gradient():
    """deepmd-kit 3.2.0's weights, inputs and outputs for five option sets (defaults; the DPA-3.1
    options: split compression, distance edge input, exp switch, dynamic sel, silut; linear
    compression with two edge-message heads, unoptimised updates, res_incr, std from data;
    sequential updates; no angle channel with res_avg): same descriptor and gradient to round-off."""
    ref = np.load(DEEPMD_REFERENCE)
    cases = sorted({k.split("/")[0] for k in ref.files})
    assert len(cases) == 5
    for case in cases:
        kw = json.loads(str(ref[f"{case}/kwargs"]))
        model = DPA3(DPA3Config(type="dpa3", precision="float64", **kw), 3)
        theirs = {k.split("/state/")[1]: torch.as_tensor(ref[k]) for k in ref.files if k.startswith(f"{case}/state/")}
        state = {from_deepmd_key(k): v for k, v in theirs.items() if from_deepmd_key(k) is not None}
        assert set(state) == set(model.state_dict()), case
        model.load_state_dict(state)
        coord_ext = torch.as_tensor(ref[f"{case}/coord_ext"]).requires_grad_(True)
        d = model(coord_ext, torch.as_tensor(ref[f"{case}/atype_ext"]), [torch.as_tensor(ref[f"{case}/nlist"])],
                  mapping=torch.as_tensor(ref[f"{case}/mapping"])).descriptor
        (grad,) = torch.autograd.grad((d**2).sum(), coord_ext)
        np.testing.assert_allclose(d.detach().numpy(), ref[f"{case}/descriptor"], rtol=0, atol=1e-12, err_msg=case)
        np.testing.assert_allclose(grad.numpy(), ref[f"{case}/grad"], rtol=0, atol=1e-11, err_msg=case)


class TestDPA3(PotentialContract):
    """res_residual, parallel updates, smooth edge update, linear angle compression, two
    edge-message heads, concatenated type embedding in the output."""

    def make_model(self, dtype=torch.float64):
        return dpa3_model(self.type_map, dtype, {"smooth_edge_update": True, "a_dim": 8, "a_compress_rate": 2,
                                                 "n_multi_edge_message": 2}, concat_output_tebd=True)

    def test_energy_smooth_as_neighbour_crosses_a_rcut(self):
        """The far atom stays inside e_rcut while it leaves the angle list."""
        model = self.make_model(torch.float64)
        es, fs = crossing(self, model, SMALL["a_rcut"])
        assert jump(es) < 1e-9 and jump(fs) < 1e-6
        assert np.ptp(fs) > 0  # the edge channel still feels the atom

    def test_deepmd_default_edge_update_jumps_at_a_rcut(self):
        """smooth_edge_update: false (deepmd-kit's default) swaps the angle message of an edge that
        leaves the angle list for the edge itself: the energy jumps there (documented in dpa3.py)."""
        model = dpa3_model(self.type_map, torch.float64, {"smooth_edge_update": False})
        es, _ = crossing(self, model, SMALL["a_rcut"])
        assert jump(es) > 1e-7  # 100x the smooth bound below


def jump(values: np.ndarray) -> float:
    """Largest second difference on the 2e-4 A grid: a step of size J shows as J, a smooth curve
    as |f''| h^2 (the far atom is still inside e_rcut, so the energy keeps a slope there)."""
    return float(np.max(np.abs(np.diff(values, 2))))


def crossing(test, model, rcut):
    t = test._map(np.array([0, 1, 2]))
    es, fs = [], []
    for x in rcut + np.linspace(-1e-3, 1e-3, 11):
        out = test.energy(model, np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, x, 0.0]]), None, t)
        es.append(out["energy"][0])
        fs.append(out["force"][0][2, 1])
    return np.array(es), np.array(fs)


class TestDPA3Sequential(PotentialContract):
    """The DPA-3.1 options: sequential updates, split compression, distance edge input, dynamic sel
    (the empty tail of the lists dropped), std from data, norm-initialised residuals, silut."""

    def make_model(self, dtype=torch.float64):
        return dpa3_model(self.type_map, dtype,
                          {"smooth_edge_update": True, "sequential_update": True, "a_compress_rate": 1,
                           "a_compress_e_rate": 2, "a_compress_use_split": True, "edge_init_use_dist": True,
                           "use_dynamic_sel": True, "sel_reduce_factor": 4.0, "fix_stat_std": 0.0,
                           "update_residual_init": "norm"}, activation_function="silut:2.0")

    def test_energy_smooth_as_neighbour_crosses_a_rcut(self):
        es, fs = crossing(self, self.make_model(), SMALL["a_rcut"])
        assert jump(es) < 1e-9 and jump(fs) < 1e-6


def test_dpa3_config_refuses_unsupported_options_in_one_line_naming_the_key():
    def parse(repflow=None, **top):
        d = {"type": "dpa3", "repflow": {**SMALL, **(repflow or {})}, **top}
        return parse_config(ModelConfig, {"type_map": ["H", "C"], "descriptor": d}, "m.yaml")

    for key, value in (("exclude_types", [[0, 1]]), ("add_chg_spin_ebd", True), ("use_econf_tebd", True)):
        with pytest.raises(ConfigError, match=rf"^m.yaml: descriptor: .*{key} is not supported[^\n]*$"):
            parse(**{key: value})
    with pytest.raises(ConfigError, match=r"^m.yaml: descriptor.repflow.g_dim: unknown key$"):
        parse({"g_dim": 4})
    with pytest.raises(ConfigError, match=r"descriptor.repflow: .*a_rcut 5.0 must be <= e_rcut 4.0"):
        parse({"a_rcut": 5.0})
    with pytest.raises(ConfigError, match=r"use_dynamic_sel needs smooth_edge_update"):
        parse({"use_dynamic_sel": True})
    with pytest.raises(ConfigError, match=r"activation_function 'swish'"):
        parse(activation_function="swish")
    cfg = parse({"edge_use_dist": True, "use_env_envelope": True}).descriptor  # deepmd-kit's aliases
    assert cfg.repflow.edge_init_use_dist and cfg.repflow.use_exp_switch and cfg.rcut == 4.0
    assert ModelConfig.model_validate({"type_map": ["H", "C"], "descriptor": cfg.model_dump(mode="json")}).descriptor == cfg


def test_dpa3_resolves_both_sel_from_data_and_fits_std_only_when_asked():
    systems = load_systems(str(data_path("ch4_pbe", "train")), ["H", "C"])
    for fix, fitted in ((0.3, False), (0.0, True)):
        repflow = {**SMALL, "e_sel": "auto", "a_sel": "auto:1.5", "fix_stat_std": fix}
        cfg = parse_config(TrainConfig, {"model": {"type_map": ["H", "C"], "descriptor": {"type": "dpa3", "repflow": repflow}},
                                         "training": {"training_data": {"systems": "x"}}}, "t.yaml")
        model = build_energy_model(cfg, systems)
        rf = model.descriptor.cfg.repflow
        _, n4 = max_neighbor_counts(systems, 4.0, 2)
        _, n3 = max_neighbor_counts(systems, 3.0, 2)
        assert rf.e_sel == max(4, int(np.ceil(np.ceil(n4 * 1.1) / 4) * 4))
        assert rf.a_sel == max(4, int(np.ceil(np.ceil(n3 * 1.5) / 4) * 4))
        from lamflow.model.data.batch import DataSet
        from lamflow.model.training.stats import stat_samples

        ds = DataSet(systems, model.nlist_requests(), 4, model.dtype)
        model.descriptor.set_stats(list(stat_samples(ds, 2, "cpu", model.dtype)), 1e-2)
        env = model.descriptor.repflows.env
        assert torch.all(env.mean == 0)
        if fitted:
            assert not torch.allclose(env.stddev[0], env.stddev[1]) and torch.all(env.stddev > 1e-2)
        else:
            assert torch.all(env.stddev == 0.3)


@pytest.mark.parametrize("name", ["dpa3-small.yaml", "dpa3-paper.yaml"])
def test_dpa3_templates_are_valid_model_sections(name):
    raw = yaml.safe_load((TEMPLATES / name).read_text())
    cfg = parse_config(TrainConfig, {**raw, "training": {"training_data": {"systems": "x"}}}, name)
    rf = cfg.model.descriptor.repflow
    assert cfg.model.descriptor.type == "dpa3" and rf.smooth_edge_update
    if name == "dpa3-paper.yaml":  # DPA-3.1-3M
        assert (rf.nlayers, rf.n_dim, rf.e_dim, rf.a_dim, rf.e_rcut, rf.a_rcut) == (16, 128, 64, 32, 6.0, 4.0)
    resolved = cfg.model.descriptor.model_copy(update={"repflow": rf.model_copy(update={"e_sel": 120, "a_sel": 40})})
    model = EnergyModel(cfg.model.model_copy(update={"descriptor": resolved}))
    assert model.descriptor.dim_out == rf.n_dim
    if name == "dpa3-paper.yaml":
        n = sum(p.numel() for n, p in model.named_parameters() if n.startswith("descriptor."))
        assert 2.5e6 < n < 3.5e6, n  # the "3M" of DPA-3.1-3M is mostly the descriptor


def small_template(type_map) -> dict:
    raw = yaml.safe_load((TEMPLATES / "dpa3-small.yaml").read_text())
    raw["model"]["type_map"] = type_map
    raw["model"]["descriptor"]["repflow"].update(e_rcut=4.0, a_rcut=3.0, a_rcut_smth=2.5)  # CPU seconds
    return raw


def test_dpa3_small_template_trains_on_ch4_and_validation_energy_error_falls(tmp_path):
    """60 steps of the small template on ch4_pbe: the validation energy RMSE falls 5x and the force
    RMSE does not rise (ch4's forces take ~100 steps to leave the zero-force plateau, whose RMSE is
    the labels' own), and the checkpoint reloads to the same predictions."""
    raw = small_template(["H", "C"])
    raw.update({
        "learning_rate": {"start_lr": 0.01, "stop_lr": 0.002, "decay_steps": 20},
        "training": {
            "training_data": {"systems": str(data_path("ch4_pbe", "train")), "batch_size": 4},
            "validation_data": {"systems": str(data_path("ch4_pbe", "valid")), "batch_size": 20, "numb_btch": 1},
            "numb_steps": 60, "seed": 1, "disp_freq": 59, "save_freq": 60, "num_threads": 1,
        },
    })
    res = train(parse_config(TrainConfig, raw, "dpa3-small.yaml"), tmp_path / "out", log=lambda *a: None)
    rows = list(csv.DictReader((tmp_path / "out" / "lcurve.csv").open()))
    first, last = rows[0], rows[-1]
    assert float(last["rmse_e_val"]) < 0.2 * float(first["rmse_e_val"]), (first, last)
    assert float(last["rmse_f_val"]) <= float(first["rmse_f_val"]), (first, last)
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.tasks.evaluate import evaluate_systems

    valid = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])
    again = evaluate_systems(load_model(res.checkpoint), valid)["overall"]
    assert again["rmse_f"] == pytest.approx(res.metrics["rmse_f"], rel=1e-9)


def test_dpa3_multitask_energy_and_denoise_losses_fall(tmp_path):
    """A shared DPA-3 with an energy branch on CH4 and a denoise branch (with the MASK token) on
    unlabelled C/H/O molecules: both branches' validation errors fall in 150 steps."""
    from lamflow.model.training.multitask import train_multitask
    from lamflow.model.training.multitask_config import load_multitask_config

    ch4_tr = write_subset(data_path("ch4_pbe", "train"), tmp_path / "ch4" / "train", 40, 5)
    ch4_va = write_subset(data_path("ch4_pbe", "valid"), tmp_path / "ch4" / "valid", 10, 6)
    st_tr = write_subset(data_path("chon_nopbc", "train"), tmp_path / "chon" / "train", 100, 5, labels=False)
    st_va = write_subset(data_path("chon_nopbc", "valid"), tmp_path / "chon" / "valid", 20, 10, labels=False)
    desc = small_template(["H", "C", "O"])["model"]["descriptor"]
    cfg = {
        "model": {"shared_dict": {"type_map_all": ["H", "C", "O"], "dpa3": desc},
                  "model_dict": {"ch4": {"type_map": ["H", "C"], "descriptor": "dpa3",
                                         "fitting_net": {"neuron": [16], "seed": 2}},
                                 "noise": {"task": "denoise", "type_map": "type_map_all", "descriptor": "dpa3",
                                           "fitting_net": {"neuron": [16], "seed": 3}}}},
        "learning_rate": {"start_lr": 0.01, "stop_lr": 0.001, "decay_steps": 20},
        "loss_dict": {"noise": {"type": "denoise", "noise": 0.3, "noise_ratio": 0.2, "mask_ratio": 0.15}},
        "training": {"model_prob": {"ch4": 1, "noise": 2},
                     "data_dict": {"ch4": {"training_data": {"systems": str(ch4_tr), "batch_size": 4},
                                           "validation_data": {"systems": str(ch4_va), "batch_size": 10}},
                                   "noise": {"training_data": {"systems": str(st_tr), "batch_size": 4},
                                             "validation_data": {"systems": str(st_va), "batch_size": 20}}},
                     "numb_steps": 150, "seed": 2, "disp_freq": 30, "save_freq": 150, "device": "cpu"},
    }
    res = train_multitask(load_multitask_config(write_yaml(cfg, tmp_path / "mt.yaml")), tmp_path / "out", log=lambda *a: None)
    rows = list(csv.DictReader((res.out_dir / "lcurve.csv").read_text().splitlines()))
    for key in ("ch4:rmse_f_val", "noise:ce_type_val"):
        assert float(rows[-1][key]) < 0.9 * float(rows[0][key]), (key, rows[0][key], rows[-1][key])

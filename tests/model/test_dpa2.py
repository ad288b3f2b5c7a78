"""DPA-2: the physics contract for two option sets, smoothness at both cutoffs, ghost atoms
carrying their local atom's features, config checks, sel: auto, statistics, the templates, and a
short training run on ch4_pbe."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, data_path
from physics import PotentialContract

from lamflow.model.data.batch import max_neighbor_counts
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import ConfigError
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.descriptor.base import EnvMatBlock
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.schema import parse_config
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.trainer import build_energy_model, train

TEMPLATES = REPO / "templates"


def randomize_stats(model: EnergyModel, seed: int = 0) -> EnergyModel:
    """Std (and, where set_davg_zero is off, mean) per centre type, tiled over slots as data
    statistics are; larger residual weights and an energy bias, so that padding, normalisation
    and every update term are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (b for b in model.modules() if isinstance(b, EnvMatBlock)):
            m = 0.1 * torch.rand(block.mean.shape[0], 1, 4, generator=g, dtype=torch.float64)
            m[..., 1:] = 0
            block.mean.copy_((0 * m if block.set_davg_zero else m).expand(block.mean.shape).to(block.mean))
            s = 0.5 + torch.rand(block.mean.shape[0], 1, 2, generator=g, dtype=torch.float64)
            s = torch.cat([s[..., :1], s[..., 1:].expand(-1, -1, 3)], -1)
            block.stddev.copy_(s.expand(block.stddev.shape).to(block.stddev))
        model.out_bias.copy_(torch.tensor([-3.0, -1.0, -7.0]).to(model.out_bias))
        for name, p in model.named_parameters():
            if "_residual." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    return model


def dpa2_model(type_map, dtype, repinit: dict, repformer: dict, **top) -> EnergyModel:
    prec = "float64" if dtype == torch.float64 else "float32"
    cfg = ModelConfig(
        type_map=type_map,
        descriptor={"type": "dpa2", "repinit": repinit, "repformer": repformer, "precision": prec, "seed": 1, **top},
        fitting_net={"neuron": [8, 8], "seed": 2, "precision": prec},
    )
    return randomize_stats(EnergyModel(cfg))


class TestDPA2(PotentialContract):
    """res_avg with g2 attention (gated), h2 update, g1g1 and local g1 attention; concat repinit
    with the three-body block."""

    inner_rcuts = (3.0, 3.5)  # repformer, three-body; the contract's own test covers repinit's 4.0

    def make_model(self, dtype=torch.float64):
        return dpa2_model(
            self.type_map, dtype,
            {"rcut": 4.0, "rcut_smth": 0.5, "nsel": 40, "neuron": [4, 8], "axis_neuron": 4, "tebd_dim": 4,
             "use_three_body": True, "three_body_rcut": 3.5, "three_body_rcut_smth": 0.5, "three_body_sel": 32,
             "three_body_neuron": [2, 4]},
            {"rcut": 3.0, "rcut_smth": 1.0, "nsel": 24, "nlayers": 2, "g1_dim": 8, "g2_dim": 4,
             "axis_neuron": 2, "attn1_hidden": 4, "attn1_nhead": 2, "attn2_hidden": 4, "attn2_nhead": 2,
             "attn2_has_gate": True, "update_h2": True, "set_davg_zero": False},
        )

    def test_energy_smooth_as_neighbour_crosses_repformer_and_three_body_rcut(self):
        """The far atom stays inside the repinit sphere while it leaves the inner ones."""
        model = self.make_model(torch.float64)
        t = self._map(np.array([0, 1, 2]))
        for rcut in self.inner_rcuts:
            xs = rcut + np.linspace(-1e-3, 1e-3, 11)
            es, fs = [], []
            for x in xs:
                c = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, x, 0.0]])
                out = self.energy(model, c, None, t)
                es.append(out["energy"][0])
                fs.append(out["force"][0][2, 1])
            assert np.max(np.abs(np.diff(es))) < 1e-7, rcut
            assert np.max(np.abs(np.diff(fs))) < 1e-5, rcut
            assert np.ptp(fs) > 0  # the repinit block still feels the atom

    def test_repformer_reads_ghost_features_through_mapping(self):
        """Ghost neighbours carry their local atom's g1: without the mapping the model refuses,
        and a wrong mapping changes the energy (the supercell test checks the right one)."""
        from lamflow.model.data.batch import collate
        from lamflow.model.data.neighbor import build_graph
        from lamflow.model.data.systems import System
        from lamflow.model.nn.potential import extended_inputs

        model = self.make_model(torch.float64)
        coord, box, atype = self._small_periodic()
        atype = self._map(atype)
        graph = build_graph(coord, box, atype, model.nlist_requests())
        batch = collate([(System("cell", self.type_map, atype, coord[None], box[None]), 0, graph)], torch.float64)
        coord_ext, atype_ext = extended_inputs(batch, torch.float64)
        e = model.atomic_energy(coord_ext, atype_ext, batch.nlists, mapping=batch.mapping).sum().item()
        with pytest.raises(ValueError, match="mapping"):
            model.atomic_energy(coord_ext, atype_ext, batch.nlists)
        wrong = batch.mapping.clone()
        wrong[:, len(coord):] = (wrong[:, len(coord):] + 1) % len(coord)
        e_wrong = model.atomic_energy(coord_ext, atype_ext, batch.nlists, mapping=wrong).sum().item()
        assert abs(e - e_wrong) > 1e-8


class TestDPA2ResidualG1Attention(PotentialContract):
    """res_residual with local g1 attention, no g2 attention, strip repinit (and three-body) with
    type_one_side and a non-zero mean, direct_dist, convolution and self-MLP inside the
    concatenated MLP, tebd added to the repinit output."""

    def make_model(self, dtype=torch.float64):
        return dpa2_model(
            self.type_map, dtype,
            {"rcut": 4.0, "rcut_smth": 0.5, "nsel": 40, "neuron": [4, 8], "axis_neuron": 2, "tebd_dim": 4,
             "tebd_input_mode": "strip", "type_one_side": True, "set_davg_zero": False, "use_three_body": True,
             "three_body_rcut": 3.2, "three_body_rcut_smth": 2.0, "three_body_sel": 24, "three_body_neuron": [2, 4]},
            {"rcut": 3.5, "rcut_smth": 0.5, "nsel": 28, "nlayers": 2, "g1_dim": 8, "g2_dim": 4, "axis_neuron": 2,
             "update_g2_has_attn": False, "update_g1_has_attn": True, "attn1_hidden": 4, "attn1_nhead": 2,
             "update_style": "res_residual", "direct_dist": True, "g1_out_conv": False, "g1_out_mlp": False,
             "activation_function": "silu"},
            add_tebd_to_repinit_out=True, use_tebd_bias=True,
        )


DEEPMD_REFERENCE = Path(__file__).parents[1] / "data" / "dpa2_deepmd_3.2.0.npz"  # tests/data/make_dpa2_reference.py


def test_dpa2_matches_deepmd_kit_descriptor_and_gradient():
    """deepmd-kit 3.2.0's weights, inputs and outputs for four option sets (res_avg / res_residual
    / res_incr, concat / strip, three-body, gate, h2, direct_dist, non-smooth, ...): same
    descriptor and gradient to round-off, with the weights renamed by from_deepmd_key."""
    import json

    from lamflow.model.nn.descriptor.dpa2 import DPA2, from_deepmd_key
    from lamflow.model.nn.descriptor_config import DPA2Config

    ref = np.load(DEEPMD_REFERENCE)
    cases = sorted({k.split("/")[0] for k in ref.files})
    assert len(cases) == 4
    for case in cases:
        kw = json.loads(str(ref[f"{case}/kwargs"]))
        model = DPA2(DPA2Config(type="dpa2", precision="float64", **kw), 3)
        theirs = {k.split("/state/")[1]: torch.as_tensor(ref[k]) for k in ref.files if k.startswith(f"{case}/state/")}
        state = {from_deepmd_key(k): v for k, v in theirs.items() if from_deepmd_key(k) is not None}
        assert set(state) == set(model.state_dict()), case
        model.load_state_dict(state)
        coord_ext = torch.as_tensor(ref[f"{case}/coord_ext"]).requires_grad_(True)
        nlists = [torch.as_tensor(ref[f"{case}/{k}"]) for k in ("nlist_repinit", "nlist_repformer", "nlist_three_body")
                  if f"{case}/{k}" in ref.files]
        assert len(nlists) == len(model.nlist_requests())
        g1 = model(coord_ext, torch.as_tensor(ref[f"{case}/atype_ext"]), nlists,
                   mapping=torch.as_tensor(ref[f"{case}/mapping"])).descriptor
        (grad,) = torch.autograd.grad((g1**2).sum(), coord_ext)
        np.testing.assert_allclose(g1.detach().numpy(), ref[f"{case}/g1"], rtol=0, atol=1e-12, err_msg=case)
        np.testing.assert_allclose(grad.numpy(), ref[f"{case}/grad"], rtol=0, atol=1e-11, err_msg=case)


def small_cfg(**repformer) -> dict:
    return {"type": "dpa2", "repinit": {"rcut": 4.0, "rcut_smth": 0.5, "nsel": "auto", "neuron": [4, 8], "axis_neuron": 2,
                                        "tebd_dim": 4, "use_three_body": True, "three_body_rcut": 3.5,
                                        "three_body_sel": "auto:1.2", "three_body_neuron": [2, 4]},
            "repformer": {"rcut": 3.0, "rcut_smth": 1.0, "nsel": "auto:1.5", "nlayers": 1, "g1_dim": 8, "g2_dim": 4,
                          "axis_neuron": 2, "attn1_hidden": 4, "attn1_nhead": 1, "attn2_hidden": 4, "attn2_nhead": 1,
                          **repformer}}


def test_dpa2_config_rejects_unsupported_options_and_unknown_keys_naming_the_key():
    raw = {"type_map": ["H", "C"], "descriptor": {**small_cfg(), "exclude_types": [[0, 1]]}}
    with pytest.raises(ConfigError, match=r"m.yaml: descriptor: .*exclude_types"):
        parse_config(ModelConfig, raw, "m.yaml")
    raw = {"type_map": ["H", "C"], "descriptor": small_cfg()}
    raw["descriptor"]["repinit"].update(use_three_body=True, three_body_rcut=3.0, three_body_rcut_smth=3.0)
    with pytest.raises(ConfigError, match=r"m.yaml: descriptor.repinit: .*three_body_rcut_smth"):
        parse_config(ModelConfig, raw, "m.yaml")
    raw = {"type_map": ["H", "C"], "descriptor": small_cfg(g3_dim=4)}
    with pytest.raises(ConfigError, match=r"m.yaml: descriptor.repformer.g3_dim: unknown key"):
        parse_config(ModelConfig, raw, "m.yaml")
    raw = {"type_map": ["H", "C"], "descriptor": small_cfg(update_style="res_sum")}
    with pytest.raises(ConfigError, match=r"descriptor.repformer.update_style"):
        parse_config(ModelConfig, raw, "m.yaml")


def test_dpa2_config_accepts_deepmd_alias_and_reports_the_largest_cutoff():
    d = small_cfg()
    d["repformer_add_type_ebd_to_seq"] = True
    cfg = parse_config(ModelConfig, {"type_map": ["H", "C"], "descriptor": d}, "m.yaml").descriptor
    assert cfg.add_tebd_to_repinit_out and cfg.rcut == 4.0
    dumped = cfg.model_dump(mode="json")  # what a checkpoint stores
    assert ModelConfig.model_validate({"type_map": ["H", "C"], "descriptor": dumped}).descriptor == cfg


def test_dpa2_resolves_both_nsel_from_data_and_fits_both_statistics():
    systems = load_systems(str(data_path("ch4_pbe", "train")), ["H", "C"])
    cfg = parse_config(TrainConfig, {"model": {"type_map": ["H", "C"], "descriptor": small_cfg()},
                                     "training": {"training_data": {"systems": "x"}}}, "t.yaml")
    model = build_energy_model(cfg, systems)
    d = model.descriptor.cfg
    _, n4 = max_neighbor_counts(systems, 4.0, 2)
    _, n3 = max_neighbor_counts(systems, 3.0, 2)
    _, n35 = max_neighbor_counts(systems, 3.5, 2)
    assert d.repinit.nsel == max(4, int(np.ceil(np.ceil(n4 * 1.1) / 4) * 4))
    assert d.repformer.nsel == max(4, int(np.ceil(np.ceil(n3 * 1.5) / 4) * 4))
    assert d.repinit.three_body_sel == max(4, int(np.ceil(np.ceil(n35 * 1.2) / 4) * 4))
    reqs = model.nlist_requests()
    assert [(r.rcut, r.sel) for r in reqs] == [(4.0, (d.repinit.nsel,)), (3.0, (d.repformer.nsel,)),
                                               (3.5, (d.repinit.three_body_sel,))]

    from lamflow.model.data.batch import DataSet
    from lamflow.model.training.stats import stat_samples

    ds = DataSet(systems, reqs, 4, model.dtype)
    model.descriptor.set_stats(list(stat_samples(ds, 2, "cpu", model.dtype)), 1e-2)
    desc = model.descriptor
    for block in (desc.repinit.env, desc.repformers.env, desc.repinit_three_body.env):
        assert torch.all(block.mean == 0)  # set_davg_zero defaults to true for both blocks
        assert torch.all(block.stddev[:, :, 0] > 1e-2) and not torch.allclose(block.stddev[0], block.stddev[1])
    assert not torch.allclose(desc.repinit.env.stddev[0, 0], desc.repformers.env.stddev[0, 0])
    assert not torch.allclose(desc.repinit_three_body.env.stddev[0, 0], desc.repformers.env.stddev[0, 0])


@pytest.mark.parametrize("name", ["dpa2-small.yaml", "dpa2-paper.yaml"])
def test_dpa2_templates_are_valid_model_sections(name):
    raw = yaml.safe_load((TEMPLATES / name).read_text())
    cfg = parse_config(TrainConfig, {**raw, "training": {"training_data": {"systems": "x"}}}, name)
    d = cfg.model.descriptor
    assert d.type == "dpa2" and d.repinit.rcut > d.repformer.rcut
    if name == "dpa2-paper.yaml":  # examples/water/dpa2/input_torch_medium.json sizes
        assert (d.repformer.nlayers, d.repformer.g1_dim, d.repformer.g2_dim) == (6, 128, 32)
        assert d.repinit.use_three_body and d.repinit.three_body_sel == 48
    resolved = d.model_copy(update={"repinit": d.repinit.model_copy(update={"nsel": 120, "three_body_sel": 48}),
                                    "repformer": d.repformer.model_copy(update={"nsel": 48})})
    model = EnergyModel(cfg.model.model_copy(update={"descriptor": resolved}))
    assert model.descriptor.dim_out == d.repformer.g1_dim + d.repinit.tebd_dim


def test_dpa2_small_template_trains_on_ch4_and_validation_force_error_falls(tmp_path):
    """~60 steps of the small template on ch4_pbe: the validation force RMSE falls, and the
    checkpoint reloads to the same predictions."""
    raw = yaml.safe_load((TEMPLATES / "dpa2-small.yaml").read_text())
    raw["model"]["type_map"] = ["H", "C"]
    raw.update({
        "learning_rate": {"start_lr": 0.005, "stop_lr": 0.001, "decay_steps": 20},
        "training": {
            "training_data": {"systems": str(data_path("ch4_pbe", "train")), "batch_size": 4},
            "validation_data": {"systems": str(data_path("ch4_pbe", "valid")), "batch_size": 20, "numb_btch": 1},
            "numb_steps": 60, "seed": 1, "disp_freq": 59, "save_freq": 60, "num_threads": 1,
        },
    })
    cfg = parse_config(TrainConfig, raw, "dpa2-small.yaml")
    res = train(cfg, tmp_path / "out", log=lambda *a: None)
    import csv

    rows = list(csv.DictReader((tmp_path / "out" / "lcurve.csv").open()))
    first, last = float(rows[0]["rmse_f_val"]), float(rows[-1]["rmse_f_val"])
    assert last < 0.8 * first, (first, last)
    # the checkpoint rebuilds the same model (resolved nsel, three-body list, weights)
    from lamflow.model.io.checkpoint import load_model
    from lamflow.model.tasks.evaluate import evaluate_systems

    valid = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])
    again = evaluate_systems(load_model(res.checkpoint), valid)["overall"]
    assert again["rmse_f"] == pytest.approx(res.metrics["rmse_f"], rel=1e-9)

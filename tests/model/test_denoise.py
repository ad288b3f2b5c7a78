"""Denoise pre-training: corruption, the MASK token, equivariance of the displacement head, and a
short multi-task run (an energy branch plus a structure-only denoise branch) in which the denoise
loss falls."""

import csv

import numpy as np
import pytest
import torch
from conftest import data_path
from multitask_helpers import write_subset, write_yaml  # noqa: F401
from physics import random_rotation

from lamflow.model.data.batch import collate
from lamflow.model.data.neighbor import build_graph
from lamflow.model.data.systems import System, load_systems
from lamflow.model.errors import ConfigError
from lamflow.model.nn.config import MASK
from lamflow.model.nn.multitask import DenoiseHeadConfig, EnergyHeadConfig, MultiTaskModel, MultiTaskModelConfig
from lamflow.model.nn.potential import extended_inputs
from lamflow.model.training.config import DenoiseLossConfig
from lamflow.model.training.denoise import corrupt
from lamflow.model.training.multitask import train_multitask
from lamflow.model.training.multitask_config import load_multitask_config, parse_multitask_config
from lamflow.model.training.pretrained import load_branch

SE_ATTEN = {"type": "se_atten", "rcut": 3.5, "rcut_smth": 0.5, "sel": 60, "neuron": [4, 8], "axis_neuron": 4,
            "tebd_dim": 4, "attn": 8, "attn_layer": 1, "seed": 1}
SE_E2_A = {"type": "se_e2_a", "rcut": 3.5, "rcut_smth": 0.5, "sel": [30, 30, 30], "neuron": [4, 8], "axis_neuron": 4, "seed": 1}
DPA2 = {"type": "dpa2", "repinit": {"rcut": 3.5, "rcut_smth": 0.5, "nsel": 60, "neuron": [4, 8], "axis_neuron": 2, "tebd_dim": 4},
        "repformer": {"rcut": 3.0, "rcut_smth": 0.5, "nsel": 40, "nlayers": 1, "g1_dim": 8, "g2_dim": 4, "axis_neuron": 2,
                      "attn1_hidden": 4, "attn1_nhead": 1, "attn2_hidden": 4, "attn2_nhead": 1}, "seed": 1}


def denoise_model(descriptor: dict, mask: bool) -> MultiTaskModel:
    elements = ["C", "H", "O"]
    cfg = MultiTaskModelConfig(
        type_map=elements + ([MASK] if mask else []), descriptor=descriptor,
        branches={"e": EnergyHeadConfig(type_map=elements, fitting_net={"neuron": [8], "seed": 2}),
                  "dn": DenoiseHeadConfig(type_map=elements, fitting_net={"neuron": [8], "seed": 3})})
    model = MultiTaskModel(cfg)
    with torch.no_grad():  # the head starts at zero output; give it random weights so the test means something
        g = torch.Generator().manual_seed(0)
        for p in model.heads["dn"].parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def displacement(model, coord, box, atype):
    frame = System("frame", model.type_map, atype, coord[None], None if box is None else box[None])
    batch = collate([(frame, 0, build_graph(coord, box, atype, model.nlist_requests()))], model.dtype)
    coord_ext, atype_ext = extended_inputs(batch, model.dtype)
    dx, logits = model.denoise("dn", coord_ext, atype_ext, batch.nlists, batch.mapping)
    return dx[0].detach().numpy(), logits[0].detach().numpy()


@pytest.mark.parametrize("descriptor", [SE_ATTEN, SE_E2_A, DPA2], ids=["se_atten", "se_e2_a", "dpa2"])
def test_denoise_displacement_rotates_with_the_structure(descriptor):
    model = denoise_model(descriptor, mask=False)
    s = load_systems(str(data_path("chon_nopbc", "valid")), ["C", "H", "O"])[0]
    coord, atype = s.coord[0], s.atype
    rng = np.random.default_rng(3)
    rot = random_rotation(rng)
    dx, logits = displacement(model, coord, None, atype)
    dx_r, logits_r = displacement(model, coord @ rot.T + rng.normal(size=3), None, atype)
    assert np.abs(dx).max() > 1e-3  # a non-trivial displacement field
    np.testing.assert_allclose(dx_r, dx @ rot.T, atol=1e-10)
    np.testing.assert_allclose(logits_r, logits, atol=1e-10)
    perm = rng.permutation(len(atype))
    dx_p, _ = displacement(model, coord[perm], None, atype[perm])
    np.testing.assert_allclose(dx_p, dx[perm], atol=1e-10)


@pytest.mark.parametrize("descriptor", [SE_ATTEN, DPA2], ids=["se_atten", "dpa2"])
def test_denoise_displacement_of_a_periodic_frame_rotates_with_cell(descriptor):
    model = denoise_model(descriptor, mask=True)  # with the MASK pseudo-type; dpa2 passes messages over images
    s = load_systems(str(data_path("water_h2o", "valid")), ["C", "H", "O"])[0]
    rot = random_rotation(np.random.default_rng(5))
    dx, _ = displacement(model, s.coord[0], s.box[0], s.atype)
    dx_r, _ = displacement(model, s.coord[0] @ rot.T, s.box[0] @ rot.T, s.atype)
    np.testing.assert_allclose(dx_r, dx @ rot.T, atol=1e-10)


def test_corrupt_masks_and_displaces_the_chosen_share_of_real_atoms():
    s = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0]
    w = load_systems(str(data_path("water_h2o", "valid")), ["H", "C", "O"])[0]
    reqs = denoise_model(SE_ATTEN, mask=True).nlist_requests()
    items = [(x, 0, build_graph(x.coord[0], x.box[0], x.atype, reqs)) for x in (s, w)]
    batch = collate(items, torch.float64)  # frame 0 padded from 5 to 192 atoms
    cfg = DenoiseLossConfig(noise=0.3, noise_ratio=0.5, mask_ratio=0.2)
    noisy, target, noised, masked, clean = corrupt(batch, cfg, mask_type=3, generator=torch.Generator().manual_seed(1))
    real = batch.atype >= 0
    assert noised.sum(1).tolist() == [2, 96] and masked.sum(1).tolist() == [1, 38]  # round(r n), at least 1
    assert not (noised & ~real).any() and not (masked & ~real).any()
    assert (noisy.atype[masked] == 3).all() and torch.equal(noisy.atype[~masked], batch.atype[~masked])
    assert torch.equal(clean, batch.atype)
    np.testing.assert_allclose((noisy.coord - batch.coord).numpy(), -target.numpy())
    assert (target[~noised] == 0).all() and 0.2 < target[noised].std() < 0.4


def test_type_masking_with_a_typed_descriptor_is_a_config_error(tmp_path):
    cfg = {"model": {"shared_dict": {"tm": ["H", "C"], "d": SE_E2_A | {"sel": "auto"}},
                     "model_dict": {"dn": {"task": "denoise"}}},
           "loss_dict": {"dn": {"type": "denoise", "mask_ratio": 0.1}},
           "training": {"data_dict": {"dn": {"training_data": {"systems": "x"}}}}}
    with pytest.raises(ConfigError, match=r"mask_ratio > 0 needs a mixed-type descriptor"):
        parse_multitask_config(cfg, "mt.yaml")
    cfg["loss_dict"]["dn"]["type"] = "ener"  # an energy loss has no mask_ratio
    with pytest.raises(ConfigError, match=r"^mt.yaml: loss_dict.dn.mask_ratio: unknown key$"):
        parse_multitask_config(cfg, "mt.yaml")
    cfg["loss_dict"]["dn"] = {"type": "ener"}
    with pytest.raises(ConfigError, match=r"^mt.yaml: loss_dict.dn.type: 'ener' does not fit a branch with task 'denoise'$"):
        parse_multitask_config(cfg, "mt.yaml")


@pytest.fixture(scope="module")
def denoise_run(tmp_path_factory):
    """A se_atten_v2 model: an energy branch on CH4 and a denoise branch on C/H/O molecules
    without labels (coordinates only), 400 steps."""
    tmp = tmp_path_factory.mktemp("denoise")
    ch4_tr = write_subset(data_path("ch4_pbe", "train"), tmp / "ch4" / "train", 40, 5)
    ch4_va = write_subset(data_path("ch4_pbe", "valid"), tmp / "ch4" / "valid", 10, 6)
    st_tr = write_subset(data_path("chon_nopbc", "train"), tmp / "chon" / "train", 200, 5, labels=False)
    st_va = write_subset(data_path("chon_nopbc", "valid"), tmp / "chon" / "valid", 20, 10, labels=False)
    desc = {"type": "se_atten_v2", "rcut": 3.0, "rcut_smth": 0.5, "sel": "auto", "neuron": [8, 16], "axis_neuron": 4,
            "tebd_dim": 8, "attn_layer": 0, "seed": 1}
    cfg = {
        "model": {"shared_dict": {"type_map_all": ["H", "C", "O"], "dpa1": desc},
                  "model_dict": {"ch4": {"type_map": ["H", "C"], "descriptor": "dpa1",
                                         "fitting_net": {"neuron": [16], "seed": 2}},
                                 "noise": {"task": "denoise", "type_map": "type_map_all", "descriptor": "dpa1",
                                           "fitting_net": {"neuron": [16], "seed": 3}}}},
        "learning_rate": {"start_lr": 0.01, "stop_lr": 0.0005, "decay_steps": 20},
        "loss_dict": {"noise": {"type": "denoise", "noise": 0.3, "noise_ratio": 0.2, "mask_ratio": 0.15}},
        "training": {"model_prob": {"ch4": 1, "noise": 3},
                     "data_dict": {"ch4": {"training_data": {"systems": str(ch4_tr), "batch_size": 4},
                                           "validation_data": {"systems": str(ch4_va), "batch_size": 10}},
                                   "noise": {"training_data": {"systems": str(st_tr), "batch_size": 4},
                                             "validation_data": {"systems": str(st_va), "batch_size": 20}}},
                     "numb_steps": 400, "seed": 2, "disp_freq": 50, "save_freq": 400, "device": "cpu"},
    }
    path = write_yaml(cfg, tmp / "mt.yaml")
    return train_multitask(load_multitask_config(path), tmp / "out", log=lambda *a: None)


def test_denoise_loss_falls_in_a_short_multitask_run(denoise_run):
    rows = list(csv.DictReader((denoise_run.out_dir / "lcurve.csv").read_text().splitlines()))
    coord = [float(r["noise:rmse_coord_val"]) for r in rows]
    ce = [float(r["noise:ce_type_val"]) for r in rows]
    # the head starts as the trivial denoiser (no displacement: rmse = the noise, 0.3 A; uniform types:
    # ln 3); the first row is logged after one step
    assert 0.2 < coord[0] < 0.35 and abs(ce[0] - np.log(3)) < 0.1
    assert coord[-1] < 0.92 * coord[0], coord
    assert ce[-1] < 0.75 * ce[0], ce
    assert float(rows[-1]["ch4:rmse_e_val"]) < float(rows[0]["ch4:rmse_e_val"])


def test_denoise_model_keeps_mask_token_and_exports_its_energy_branch(denoise_run):
    model = load_branch(denoise_run.checkpoint, "ch4")
    assert model.type_map == ["H", "C", "O", MASK]
    with pytest.raises(Exception, match=r"branch 'noise' is a denoise head, not an energy model"):
        load_branch(denoise_run.checkpoint, "noise")

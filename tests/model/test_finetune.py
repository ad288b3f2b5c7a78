"""Fine-tuning the water / MAPbI3 / Si multi-task model on 50 CH4 frames: it beats training from
scratch with the same steps, seed and learning-rate schedule; the energy bias is re-fitted before
training (change- or set-by-statistic); elements the pretrained model lacks fail before training."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import data_path
from multitask_helpers import PRETRAIN_DESCRIPTOR, PRETRAIN_FITTING, TYPE_MAP_ALL, pretrained, write_subset  # noqa: F401

from lamflow.model.data.composition import energy_bias
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import ConfigError
from lamflow.model.io.checkpoint import load_model
from lamflow.model.io.payload import save_model
from lamflow.model.nn.infer import evaluate_system
from lamflow.model.training.config import load_train_config
from lamflow.model.training.finetune import finetune
from lamflow.model.training.pretrained import change_bias, load_branch, zero_shot
from lamflow.model.training.trainer import train
from lamflow.workflows.cli import main

QUIET = lambda *a: None  # noqa: E731
STEPS = 150


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    res, _ = pretrained(tmp_path_factory)
    return res.checkpoint


@pytest.fixture(scope="module")
def ch4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ch4")
    tr = write_subset(data_path("ch4_pbe", "train"), tmp / "train", 50, 4)  # 50 frames spread over the trajectory
    return tr, data_path("ch4_pbe", "valid")


def ch4_config(tmp_path, ch4, steps=STEPS, type_map=("H", "C"), **training):
    """The same config for both runs: scratch trains this model section, fine-tuning checks it."""
    tr, va = ch4
    cfg = {"model": {"type_map": list(type_map), "descriptor": PRETRAIN_DESCRIPTOR,
                     "fitting_net": {**PRETRAIN_FITTING, "seed": 3}},
           "learning_rate": {"start_lr": 0.003, "stop_lr": 0.00006, "decay_steps": max(1, steps // 10)},
           "training": {"training_data": {"systems": str(tr), "batch_size": 4},
                        "validation_data": {"systems": str(va), "batch_size": 60},
                        "numb_steps": steps, "seed": 7, "disp_freq": max(1, steps // 3), "save_freq": steps, **training}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_train_config(path)


def test_finetuning_beats_training_from_scratch_on_ch4_forces(pre, ch4, tmp_path):
    cfg = ch4_config(tmp_path, ch4)
    scratch = train(cfg, tmp_path / "scratch", log=QUIET)
    tuned = finetune(cfg, pre, tmp_path / "ft", branch="mapbi3", log=QUIET)
    # CH4 valid split (the trajectory's last 60 frames), same steps / seed / lr schedule / batches
    assert tuned.metrics["rmse_f"] < 0.6 * scratch.metrics["rmse_f"], (tuned.metrics, scratch.metrics)
    assert tuned.metrics["rmse_e_per_atom"] < scratch.metrics["rmse_e_per_atom"]
    model = load_model(tuned.checkpoint)
    assert model.type_map == TYPE_MAP_ALL  # the pretrained type map is kept
    assert json.loads((tmp_path / "ft" / "train.json").read_text())["steps"] == STEPS


def test_kept_head_bias_changes_by_statistic_and_a_new_head_is_set_by_statistic(pre, ch4):
    systems = load_systems(str(ch4[0]), TYPE_MAP_ALL)
    model = load_branch(pre, "mapbi3")
    before = evaluate_system(model, systems[0], forces=False, virial=False)["energy"]
    old = model.out_bias.clone()
    change_bias(model, systems, keep_head=True, log=QUIET)
    after = evaluate_system(model, systems[0], forces=False, virial=False)["energy"]
    counts = systems[0].counts(len(TYPE_MAP_ALL))
    delta = (model.out_bias - old).numpy()
    np.testing.assert_allclose(after - before, counts @ delta, rtol=1e-9)  # only the bias moved
    assert abs(np.mean(after - systems[0].energy)) < 1e-8  # least squares: no mean residual left
    assert np.all(delta[[TYPE_MAP_ALL.index(e) for e in ("O", "Si", "I")]] == 0)  # absent elements untouched
    model.out_bias.zero_()
    e_net = evaluate_system(model, systems[0], forces=False, virial=False)["energy"]  # the head without bias
    model.out_bias.fill_(3.0)
    change_bias(model, systems, keep_head=False, log=QUIET)  # a new head: the old bias plays no part
    np.testing.assert_allclose(model.out_bias.numpy(), energy_bias(systems, len(TYPE_MAP_ALL), residual=[e_net])[0])


def test_data_with_an_element_the_pretrained_model_lacks_fails_before_training(pre, ch4, tmp_path):
    fe = write_subset(data_path("ch4_pbe", "valid"), tmp_path / "fe", 5, rename={"C": "Fe"})
    cfg = ch4_config(tmp_path, (fe, ch4[1]), type_map=("H", "Fe"))
    with pytest.raises(ConfigError, match=r"^model.type_map: element\(s\) Fe not in the type map of .*model.ckpt \["):
        finetune(cfg, pre, tmp_path / "o", branch="mapbi3", log=QUIET)
    cfg = ch4_config(tmp_path, (fe, ch4[1]), type_map=("H",))  # a subset type map is fine, the data is not
    with pytest.raises(ConfigError, match=r"^training.training_data: the data has element\(s\) Fe that .* does not know"):
        finetune(cfg, pre, tmp_path / "o", branch="mapbi3", log=QUIET)
    assert not (tmp_path / "o" / "model.ckpt").exists()
    with pytest.raises(ConfigError, match=r"no branch 'ch4' in this model \(branches: water, mapbi3, si\)"):
        finetune(ch4_config(tmp_path, ch4), pre, tmp_path / "o", branch="ch4", log=QUIET)


def test_frozen_descriptor_keeps_pretrained_weights_and_random_head_trains(pre, ch4, tmp_path):
    cfg = ch4_config(tmp_path, ch4, steps=6)
    res = finetune(cfg, pre, tmp_path / "frozen", branch="RANDOM", freeze_descriptor=True, log=QUIET)
    tuned, base = load_model(res.checkpoint), load_model(pre)
    for k, v in base.descriptor.state_dict().items():
        assert torch.equal(tuned.descriptor.state_dict()[k], v), k
    assert not any(p.requires_grad for p in tuned.descriptor.parameters())
    assert tuned.cfg.fitting_net.seed == 3  # the RANDOM head is built from the config's fitting_net
    h = TYPE_MAP_ALL.index("H")  # not the pretrained (trained) head
    assert not torch.equal(tuned.fitting.nets[h].out.matrix, base.heads["mapbi3"].fitting.nets[h].out.matrix)


def test_single_task_pretrained_model_keeps_its_head_and_restart_continues(pre, ch4, tmp_path):
    single = tmp_path / "single.ckpt"
    save_model(load_branch(pre, "si"), single)  # a head exported from the multi-task model
    cfg = ch4_config(tmp_path, ch4, steps=8, save_freq=4)
    res = finetune(cfg, single, tmp_path / "ft", log=QUIET)
    assert load_model(res.checkpoint).cfg.fitting_net == load_model(single).cfg.fitting_net
    again = finetune(cfg, single, tmp_path / "ft", restart="auto", log=QUIET)  # finished run: nothing left to do
    assert json.loads((again.out_dir / "train.json").read_text())["steps"] == 8
    with pytest.raises(ConfigError, match="a single-task model has no branch 'si'"):
        finetune(cfg, single, tmp_path / "x", branch="si", log=QUIET)


def test_zero_shot_refits_only_the_energy_bias(pre, ch4):
    va = load_systems(str(ch4[1]), ["H", "C"])  # another type map: re-indexed by element name
    model = zero_shot(pre, va, branch="mapbi3")
    base = load_branch(pre, "mapbi3")
    for k, v in base.state_dict().items():
        if k != "out_bias":
            assert torch.equal(model.state_dict()[k], v), k
    e = evaluate_system(model, load_systems(str(ch4[1]), TYPE_MAP_ALL)[0], forces=False, virial=False)["energy"]
    assert abs(np.mean(e - va[0].energy)) < 1e-8
    with pytest.raises(ConfigError, match=r"choose a branch"):
        zero_shot(pre, va)


def test_cli_finetune_from_a_multitask_branch(pre, ch4, tmp_path, capsys):
    cfg = ch4_config(tmp_path, ch4, steps=4)
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    assert main(["train", str(path), "-o", str(tmp_path / "o"), "--finetune", str(pre), "--branch", "mapbi3"]) == 0
    assert "valid: rmse_e_per_atom" in capsys.readouterr().out
    assert main(["train", str(path), "-o", str(tmp_path / "o2"), "--finetune", str(pre), "--branch", "nope"]) == 1
    assert "no branch 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- new elements (DPA-3)

TINY_DPA3 = {"type": "dpa3", "repflow": {"n_dim": 8, "e_dim": 8, "a_dim": 4, "nlayers": 2, "e_rcut": 4.0, "e_rcut_smth": 0.5,
                                         "e_sel": "auto", "a_rcut": 3.0, "a_rcut_smth": 2.5, "a_sel": "auto", "axis_neuron": 4,
                                         "smooth_edge_update": True},
             "precision": "float64", "seed": 1}
FT_DESCRIPTOR = TINY_DPA3
NEW_MAP = ["I", "Pb", "C", "N", "H", "O"]
LR = 0.005  # the user's order; I, Pb, C, N are new, O only in the pretrained branch


@pytest.fixture(scope="module")
def water_si(tmp_path_factory):
    """A tiny DPA-3 pretrained on water and Si (two branches, shared descriptor), and MAPbI3 subsets."""
    from multitask_helpers import write_yaml

    from lamflow.model.training.multitask import train_multitask
    from lamflow.model.training.multitask_config import load_multitask_config

    tmp = tmp_path_factory.mktemp("water_si")
    sets = {"water": "water_h2o", "si": "si_pbe"}
    data = {b: (write_subset(data_path(n, "train"), tmp / b / "train", 20, 8),
                write_subset(data_path(n, "valid"), tmp / b / "valid", 4, 10))
            for b, n in sets.items()}
    cfg = {"model": {"shared_dict": {"tm": ["O", "H", "Si"], "d": FT_DESCRIPTOR},
                     "model_dict": {b: {"type_map": "tm", "descriptor": "d",
                                        "fitting_net": {"neuron": [16, 16], "seed": 2}} for b in sets}},
           "learning_rate": {"start_lr": 0.01, "stop_lr": 0.001, "decay_steps": 20},
           "training": {"data_dict": {b: {"training_data": {"systems": str(tr), "batch_size": 1},
                                          "validation_data": {"systems": str(va), "batch_size": 4}}
                                      for b, (tr, va) in data.items()},
                        "numb_steps": 150, "seed": 1, "disp_freq": 150, "save_freq": 150, "device": "cpu"}}
    res = train_multitask(load_multitask_config(write_yaml(cfg, tmp / "pre.yaml")), tmp / "pre", log=QUIET)
    mapbi3 = (write_subset(data_path("mapbi3_scan", "train"), tmp / "mapbi3" / "train", 30, 15),
              write_subset(data_path("mapbi3_scan", "valid"), tmp / "mapbi3" / "valid", 10, 12))
    return res.checkpoint, data["water"][1], mapbi3


def mapbi3_config(tmp_path, mapbi3, steps=100, descriptor=None):
    tr, va = mapbi3
    cfg = {"model": {"type_map": NEW_MAP, "descriptor": descriptor or FT_DESCRIPTOR,
                     "fitting_net": {"neuron": [16, 16], "seed": 2}},
           "learning_rate": {"start_lr": LR, "stop_lr": LR / 10, "decay_steps": 10},
           "training": {"training_data": {"systems": str(tr), "batch_size": 1},
                        "validation_data": {"systems": str(va), "batch_size": 10},
                        "numb_steps": steps, "seed": 7, "disp_freq": steps, "save_freq": steps}}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_train_config(path)


def test_change_type_map_keeps_known_elements_and_gives_new_ones_data_statistics(water_si):
    """Re-indexing alone (no training) onto [I, Pb, C, N, H, O]: the water branch predicts water
    exactly as before; I, Pb, C, N get fresh embeddings, std from the MAPbI3 data and bias 0."""
    from lamflow.model.nn.potential import EnergyModel
    from lamflow.model.training.finetune import change_type_map

    ckpt, water_valid, mapbi3 = water_si
    base = load_branch(ckpt, "water")
    fresh = EnergyModel(base.cfg.model_copy(update={"type_map": NEW_MAP}))
    model = change_type_map(base, fresh, load_systems(str(mapbi3[0]), NEW_MAP))
    assert model.type_map == NEW_MAP
    w_old, w_new = load_systems(str(water_valid), base.type_map)[0], load_systems(str(water_valid), NEW_MAP)[0]
    a, b = evaluate_system(base, w_old), evaluate_system(model, w_new)
    np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-12)
    np.testing.assert_allclose(b["force"], a["force"], atol=1e-10)
    old_tab, new_tab = base.descriptor.type_embedding.table(), model.descriptor.type_embedding.table()
    for e in ("O", "H"):
        assert torch.equal(new_tab[NEW_MAP.index(e)], old_tab[base.type_map.index(e)])
        assert model.out_bias[NEW_MAP.index(e)] == base.out_bias[base.type_map.index(e)]
    new = [NEW_MAP.index(e) for e in ("I", "Pb", "C", "N")]
    assert torch.all(model.out_bias[new] == 0)
    assert not any(torch.allclose(new_tab[i], old_tab[j]) for i in new for j in range(3))


def test_finetune_onto_new_elements_beats_scratch(water_si, tmp_path):
    """Fine-tuning the water branch onto MAPbI3 (I, Pb, C, N new; type map in the user's order)
    beats the same steps from scratch on MAPbI3 forces and energies."""
    ckpt, _, mapbi3 = water_si
    cfg = mapbi3_config(tmp_path, mapbi3)
    scratch = train(cfg, tmp_path / "scratch", log=QUIET)
    tuned = finetune(cfg, ckpt, tmp_path / "ft", branch="water", log=QUIET)
    assert tuned.metrics["rmse_f"] < 0.9 * scratch.metrics["rmse_f"], (tuned.metrics, scratch.metrics)
    assert load_model(tuned.checkpoint).type_map == NEW_MAP


def test_se_e2_a_finetune_onto_new_elements_fails_naming_them(pre, tmp_path):
    """The se_e2_a multi-task model (one net per type pair) cannot add elements: one line naming
    them (MAPbI3 with Pb renamed Sn, which the pretrained type map lacks)."""
    sn = write_subset(data_path("mapbi3_scan", "valid"), tmp_path / "sn", 2, rename={"Pb": "Sn"})
    cfg = mapbi3_config(tmp_path, (sn, sn))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"type_map": ["I", "Sn", "C", "N", "H"]})})
    with pytest.raises(ConfigError,
                       match=r"^model.type_map: element\(s\) Sn not in the type map of .*se_e2_a .*cannot add elements$"):
        finetune(cfg, pre, tmp_path / "o", branch="mapbi3", log=QUIET)
    assert not (tmp_path / "o" / "model.ckpt").exists()


def test_show_and_change_bias_commands_on_a_multitask_dpa3_checkpoint(water_si, tmp_path, capsys):
    """`lamflow show --json`: type map, branches with their observed types, cutoffs; `lamflow
    change-bias`: -s re-fits one branch's bias (no mean residual left), -b sets it, nothing else moves."""
    ckpt, water_valid, _ = water_si
    assert main(["show", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "multitask" and info["type_map"] == ["O", "H", "Si"]
    assert info["descriptor"]["type"] == "dpa3" and info["descriptor"]["inner_rcuts"] == {"e_rcut": 4.0, "a_rcut": 3.0}
    assert {n: b["observed_types"] for n, b in info["branches"].items()} == {"water": ["O", "H"], "si": ["Si"]}
    assert main(["show", str(ckpt)]) == 0 and "branch water (ener)" in capsys.readouterr().out

    out = tmp_path / "cb.ckpt"
    assert main(["change-bias", str(ckpt), "-s", str(water_valid), "--branch", "water", "-o", str(out)]) == 0
    before, after = read_checkpoint_state(ckpt), read_checkpoint_state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"heads.water.out_bias"}
    water = load_systems(str(water_valid), ["O", "H", "Si"])
    e = evaluate_system(load_branch(out, "water"), water[0], forces=False, virial=False)["energy"]
    assert abs(np.mean(e - water[0].energy)) < 1e-8
    assert main(["change-bias", str(ckpt), "-b", "1", "2", "3", "--branch", "si", "-o", str(out)]) == 0
    assert read_checkpoint_state(out)["heads.si.out_bias"].tolist() == [1.0, 2.0, 3.0]
    capsys.readouterr()
    assert main(["change-bias", str(ckpt), "-b", "1", "2", "-o", str(out)]) == 1
    assert "choose a branch" in capsys.readouterr().err


def read_checkpoint_state(path):
    from lamflow.model.io.checkpoint import read_checkpoint

    return read_checkpoint(path)["state_dict"]


def test_validate_reports_new_elements_as_added_or_refused_by_descriptor(water_si, pre, tmp_path, capsys):
    """`lamflow validate` of a pipeline fine-tuning a given checkpoint on MAPbI3: with the DPA-3
    (type embedding) checkpoint the new elements are a note, "new, will be added"; with the se_e2_a
    one (MAPbI3 with Pb renamed Sn) they are a problem naming them."""
    ckpt, _, mapbi3 = water_si
    sn = write_subset(data_path("mapbi3_scan", "valid"), tmp_path / "sn", 2, rename={"Pb": "Sn"})
    for name, model, data, ok in (("dpa3", ckpt, mapbi3[1], True), ("se", pre, sn, False)):
        doc = {"name": "t", "datasets": {"m": {"train": str(data), "valid": str(data)}},
               "stages": {"finetune": {"systems": ["m"], "pretrained": str(model), "branch": "si" if ok else "mapbi3",
                                       "training": {"numb_steps": 2}}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert main(["validate", str(path)]) == (0 if ok else 1)
        out = capsys.readouterr()
        if ok:
            assert "stages.finetune.systems: m: element(s) I, Pb, C, N not in the type map ['O', 'H', 'Si']" in out.out
            assert "new, will be added" in out.out
        else:
            assert "element(s) Sn not in the type map" in out.err and "cannot add elements" in out.err

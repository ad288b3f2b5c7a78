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

from lamflow.model.checkpoint import load_model, save_model
from lamflow.model.config import load_train_config
from lamflow.model.data import load_systems
from lamflow.model.errors import ConfigError
from lamflow.model.finetune import change_bias, finetune, zero_shot
from lamflow.model.infer import evaluate_system
from lamflow.model.multitask import load_branch
from lamflow.model.stats import energy_bias
from lamflow.model.train import train
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
    cfg = {"model": {"type_map": list(type_map), "descriptor": PRETRAIN_DESCRIPTOR, "fitting_net": {**PRETRAIN_FITTING, "seed": 3}},
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

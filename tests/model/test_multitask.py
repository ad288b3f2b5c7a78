"""Multi-task pretraining on water / MAPbI3 / Si subsets (three DFT references ~150 eV/atom apart):
every branch learns, each keeps its own energy bias, heads export as energy models, configs in
deepmd-kit's multi-task form are validated with key paths."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, data_path
from multitask_helpers import TYPE_MAP_ALL, multitask_config, pretrained, write_subset, write_yaml  # noqa: F401

from lamflow.model.data.batch import DataSet
from lamflow.model.data.composition import energy_bias
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import CheckpointError, ConfigError, DataError
from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.model.io.payload import save_model
from lamflow.model.nn.infer import evaluate_system
from lamflow.model.nn.multitask import MultiTaskModel
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.training.metrics import predict_dataset
from lamflow.model.training.multitask import branch_probabilities, train_multitask
from lamflow.model.training.multitask_config import load_multitask_config, parse_multitask_config
from lamflow.model.training.pretrained import load_branch
from lamflow.workflows.cli import main

QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pretrained(tmp_path_factory)


def lcurve(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def test_every_branch_validation_rmse_falls(run):
    res, _ = run
    rows = lcurve(res.lcurve)
    assert {r["task"] for r in rows} <= {"water", "mapbi3", "si"}
    for branch in ("water", "mapbi3", "si"):
        first, last = float(rows[0][f"{branch}:rmse_f_val"]), float(rows[-1][f"{branch}:rmse_f_val"])
        assert last < 0.8 * first, (branch, first, last)
    # energies start at the least-squares bias of each branch's own data (references 150 eV/atom
    # apart) and stay at that level while the forces train
    m = res.metrics["branches"]
    assert all(m[b]["rmse_e_per_atom"] < 0.1 for b in m), m
    assert m["si"]["rmse_f"] < 0.15 and m["water"]["rmse_f"] < 0.6  # eV/A on valid (untrained: 0.24, 0.84)
    assert (res.out_dir / "lcurve.png").stat().st_size > 1000


def test_each_branch_fits_its_own_energy_bias(run):
    res, data = run
    model = load_model(res.checkpoint)
    assert isinstance(model, MultiTaskModel) and model.type_map == TYPE_MAP_ALL
    si = TYPE_MAP_ALL.index("Si")
    assert model.heads["si"].out_bias[si].item() == pytest.approx(-107, abs=2)  # eV/atom (PBE Si)
    assert model.heads["water"].out_bias[si].item() == 0.0  # no Si in water: minimum-norm zero
    mapbi3 = load_systems(data["mapbi3"]["train"], TYPE_MAP_ALL)
    plain, _ = energy_bias(mapbi3, len(TYPE_MAP_ALL))  # fitted on the branch's own data: the same scale
    pb = TYPE_MAP_ALL.index("Pb")
    assert model.heads["mapbi3"].out_bias[pb].item() == pytest.approx(plain[pb], abs=1.0)


def test_branch_exports_as_an_energy_model_with_the_same_predictions(run, tmp_path):
    res, data = run
    mt = load_model(res.checkpoint)
    si = load_branch(res.checkpoint, "si")
    assert isinstance(si, EnergyModel) and si.type_map == TYPE_MAP_ALL
    frames = load_systems(data["si"]["valid"], TYPE_MAP_ALL)[0].subset([0, 1])
    a = evaluate_system(si, frames)
    ds = DataSet([frames], mt.nlist_requests(), 2, mt.dtype)
    (_, b), = predict_dataset(mt.branch("si"), ds)
    np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-12)
    np.testing.assert_allclose(a["force"], b["force"], atol=1e-10)
    save_model(si, tmp_path / "si.ckpt")  # a stand-alone checkpoint `lamflow test` reads
    assert main(["test", "-m", str(tmp_path / "si.ckpt"), "-s", data["si"]["valid"], "-o", str(tmp_path / "t")]) == 0
    with pytest.raises(CheckpointError, match=r"no branch 'carbon' in this model \(branches: water, mapbi3, si\)"):
        load_branch(res.checkpoint, "carbon")
    with pytest.raises(CheckpointError, match=r"choose a branch \(water, mapbi3, si\)"):
        load_branch(res.checkpoint)
    with pytest.raises(CheckpointError, match=r"single-task energy model has no branch 'si'"):
        load_branch(tmp_path / "si.ckpt", "si")
    assert isinstance(load_branch(tmp_path / "si.ckpt"), EnergyModel)


def test_model_prob_defaults_to_the_share_of_training_frames(run):
    _, data = run
    cfg = parse_multitask_config(multitask_config(data), "mt.yaml")
    train = {b: load_systems(d["train"], TYPE_MAP_ALL) for b, d in data.items()}
    p = branch_probabilities(cfg, train)
    n = {b: sum(s.nframes for s in v) for b, v in train.items()}
    assert p == pytest.approx({b: n[b] / sum(n.values()) for b in n})
    cfg = parse_multitask_config(multitask_config(data, model_prob={"water": 2, "mapbi3": 1, "si": 1}), "mt.yaml")
    assert branch_probabilities(cfg, train) == pytest.approx({"water": 0.5, "mapbi3": 0.25, "si": 0.25})


def two_ch4_branches(tmp_path, steps=20, **kw):
    tr = write_subset(data_path("ch4_pbe", "train"), tmp_path / "ch4" / "train", 16, 7)
    va = write_subset(data_path("ch4_pbe", "valid"), tmp_path / "ch4" / "valid", 6, 9)
    data = {"a": {"train": str(tr), "valid": str(va)}, "b": {"train": str(tr), "valid": str(va)}}
    desc = {"type": "se_atten", "rcut": 3.0, "rcut_smth": 0.5, "sel": 8, "neuron": [4, 8], "axis_neuron": 2,
            "tebd_dim": 4, "attn": 8, "attn_layer": 1, "seed": 1}
    cfg = multitask_config(data, descriptor=desc, steps=steps, lr=0.005, **kw)
    cfg["model"]["shared_dict"]["type_map_all"] = ["H", "C"]
    for b in data:
        cfg["training"]["data_dict"][b]["training_data"]["batch_size"] = 2
    return cfg


def test_restart_reproduces_an_uninterrupted_multitask_run(tmp_path):
    cfg = two_ch4_branches(tmp_path, steps=20, disp_freq=5, save_freq=10)
    path = write_yaml(cfg, tmp_path / "mt.yaml")
    full = train_multitask(load_multitask_config(path), tmp_path / "full", log=QUIET)
    part = tmp_path / "part"
    part.mkdir()
    (part / "model.ckpt").write_bytes((full.out_dir / "checkpoints" / "model-10.ckpt").read_bytes())
    resumed = train_multitask(load_multitask_config(path), part, restart="auto", log=QUIET)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")} for r in rows]  # noqa: E731
    a, b = strip(lcurve(full.lcurve)), strip(lcurve(resumed.lcurve))
    assert len(a) == 5 and a == b and {r["task"] for r in a} == {"a", "b"}
    for (k, v), (_, w) in zip(load_model(full.checkpoint).state_dict().items(),
                              load_model(resumed.checkpoint).state_dict().items()):
        assert torch.equal(v, w), k


def test_cli_train_runs_a_multitask_config(tmp_path, capsys):
    path = write_yaml(two_ch4_branches(tmp_path, steps=4), tmp_path / "mt.yaml")
    assert main(["train", str(path), "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "branch a (valid): rmse_e_per_atom" in out and "multi-task: a, b" in out
    assert read_checkpoint(tmp_path / "o" / "model.ckpt")["kind"] == "multitask"
    assert main(["train", str(path), "--finetune", "x.ckpt"]) == 1
    assert "take a single-task config" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"]["model_dict"]["a"]["fitting_net"].update(neuronn=[4]),
     "mt.yaml: model.model_dict.a.fitting_net.neuronn: unknown key"),
    (lambda c: c["model"]["shared_dict"]["shared"].update(rcutt=4.0), "mt.yaml: model.shared_dict.shared.rcutt: unknown key"),
    (lambda c: c["training"]["data_dict"].pop("b"), "mt.yaml: training.data_dict: no data for branch 'b'"),
    (lambda c: c.update(loss_dict={"c": {"start_pref_e": 1}}),
     "mt.yaml: loss_dict.c: no such branch in model.model_dict (a, b)"),
    (lambda c: c["training"].update(model_prob={"a": 1}), "mt.yaml: training.model_prob: no weight for branch 'b'"),
    (lambda c: c["model"]["model_dict"]["a"].update(descriptor="nope"),
     "mt.yaml: model.model_dict.a.descriptor: 'nope' is not a descriptor in model.shared_dict"),
    (lambda c: c["model"]["model_dict"]["a"].update(task="energy"),
     "mt.yaml: model.model_dict.a: unknown type 'energy' (expected 'ener', 'denoise')"),
    (lambda c: c["training"].update(numb_step=3), "mt.yaml: training.numb_step: unknown key"),
    (lambda c: c["model"]["model_dict"]["b"].update(type_map=["C", "Fe"]),
     "mt.yaml: model.model_dict.b.type_map: element(s) Fe not in the shared type map"),
])
def test_config_errors_are_one_line_with_the_key_path(tmp_path, edit, message):
    cfg = two_ch4_branches(tmp_path)
    edit(cfg)
    with pytest.raises(ConfigError) as e:
        load_multitask_config(write_yaml(cfg, tmp_path / "mt.yaml"))
    assert str(e.value) == message.replace("mt.yaml", str(tmp_path / "mt.yaml"))


def test_an_element_missing_from_the_shared_type_map_is_an_error_naming_it(tmp_path):
    cfg = two_ch4_branches(tmp_path)
    cfg["model"]["shared_dict"]["type_map_all"] = ["H", "O"]
    with pytest.raises(DataError, match=r"^branch 'a': .*element\(s\) C not in the model type map \['H', 'O'\]"):
        train_multitask(load_multitask_config(write_yaml(cfg, tmp_path / "mt.yaml")), tmp_path / "o", log=QUIET)
    cfg = two_ch4_branches(tmp_path)
    cfg["model"]["model_dict"]["b"]["type_map"] = ["H"]  # a branch's own subset of the shared type map
    with pytest.raises(DataError, match=r"^branch 'b': .*element\(s\) C not in the branch type map \['H'\]"):
        train_multitask(load_multitask_config(write_yaml(cfg, tmp_path / "mt.yaml")), tmp_path / "o", log=QUIET)


def test_multitask_template_is_a_valid_config_with_existing_data():
    cfg = load_multitask_config(REPO / "templates" / "multitask-pretrain.yaml")
    assert cfg.branches == ["water", "si", "molecules"] and cfg.masks_types
    for d in cfg.training.data_dict.values():
        for dc in (d.training_data, d.validation_data):
            assert all(Path(p).is_dir() for p in dc.system_list), dc.system_list

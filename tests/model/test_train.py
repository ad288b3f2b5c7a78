"""Training and checkpoints on real data (ch4_pbe): beats the bias-only baseline, restarts exactly,
stops clearly on NaN, round-trips checkpoints without running code."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import data_path

from lamflow.model.data.composition import energy_bias
from lamflow.model.data.systems import load_systems
from lamflow.model.errors import CheckpointError, ConfigError, TrainingError
from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.model.io.payload import save_model
from lamflow.model.tasks.evaluate import evaluate_systems
from lamflow.model.training.config import load_train_config
from lamflow.model.training.trainer import train
from lamflow.workflows.cli import main


def write_config(tmp_path, descriptor=None, steps=400, lr=0.01, batch=8, **training):
    cfg = {
        "model": {
            "type_map": ["H", "C"],
            "descriptor": descriptor or {"type": "se_e2_a", "rcut": 6.0, "rcut_smth": 0.5, "sel": "auto",
                                         "neuron": [8, 16, 32], "axis_neuron": 4, "seed": 1},
            "fitting_net": {"neuron": [32, 32, 32], "seed": 1},
        },
        "learning_rate": {"start_lr": lr, "stop_lr": lr / 100, "decay_steps": max(1, steps // 10)},
        "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {
            "training_data": {"systems": str(data_path("ch4_pbe", "train")), "batch_size": batch},
            "validation_data": {"systems": str(data_path("ch4_pbe", "valid")), "batch_size": 20, "numb_btch": 3},
            "numb_steps": steps, "seed": 1, "disp_freq": max(1, steps // 4), "save_freq": max(1, steps // 2), **training,
        },
    }
    p = tmp_path / "train.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ch4")
    cfg = load_train_config(write_config(tmp, lr=0.02))  # deepmd-kit's fitting layers (no timestep on layer 0)
    return train(cfg, tmp / "out", log=lambda *a: None), tmp


def test_ch4_model_beats_per_element_bias_baseline_on_valid(trained):
    res, _ = trained
    tr = load_systems(str(data_path("ch4_pbe", "train")), ["H", "C"])
    va = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])
    bias, _ = energy_bias(tr, 2)
    base_e = math.sqrt(np.mean(((va[0].counts(2) @ bias - va[0].energy) / va[0].natoms) ** 2))
    base_f = math.sqrt(np.mean(va[0].force ** 2))  # the bias-only model predicts zero forces
    m = evaluate_systems(load_model(res.checkpoint), va)["overall"]
    assert m["rmse_f"] < 0.6 * base_f, (m, base_f)
    assert m["rmse_e_per_atom"] < base_e, (m, base_e)


def test_training_writes_lcurve_png_json_and_atomic_checkpoints(trained):
    res, _ = trained
    out = res.out_dir
    lines = (out / "lcurve.csv").read_text().splitlines()
    assert lines[0].startswith("step,") and "rmse_f_val" in lines[0] and len(lines) >= 5
    assert (out / "lcurve.png").stat().st_size > 1000
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 400 and summary["rmse_f"] > 0
    assert not list(out.rglob("*.tmp"))
    assert (out / "checkpoints" / "model-200.ckpt").is_file()


def test_checkpoint_round_trip_gives_identical_predictions(trained, tmp_path):
    res, _ = trained
    model = load_model(res.checkpoint)
    va = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0].subset(range(5))
    a = evaluate_systems(model, [va])
    save_model(model, tmp_path / "again.ckpt")
    b = evaluate_systems(load_model(tmp_path / "again.ckpt"), [va])
    assert a == b
    payload = read_checkpoint(tmp_path / "again.ckpt")
    assert payload["type_map"] == ["H", "C"] and payload["config"]["descriptor"]["sel"] == [8, 4]
    assert "env.mean" in "".join(payload["state_dict"]) and "out_bias" in payload["state_dict"]


def test_loading_a_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "lamflow-model", "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not a lamflow checkpoint"):
        load_model(tmp_path / "evil.ckpt")
    (tmp_path / "junk.ckpt").write_text("hello")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "junk.ckpt")


def test_restart_reproduces_an_uninterrupted_run(tmp_path):
    cfg = load_train_config(write_config(tmp_path, steps=40, lr=0.005, batch=4, disp_freq=5, save_freq=20))
    full = train(cfg, tmp_path / "full", log=lambda *a: None)
    first = cfg.model_copy(update={"training": cfg.training.model_copy(update={"numb_steps": 40})})
    # interrupt: copy the step-20 checkpoint as if the run had been killed after writing it
    part = tmp_path / "part"
    part.mkdir()
    (part / "model.ckpt").write_bytes((full.out_dir / "checkpoints" / "model-20.ckpt").read_bytes())
    resumed = train(first, part, restart="auto", log=lambda *a: None)
    def curve(path):  # every column but the timing ones
        import csv

        rows = list(csv.DictReader(path.read_text().splitlines()))
        return [{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")} for r in rows]

    a, b = curve(full.out_dir / "lcurve.csv"), curve(resumed.out_dir / "lcurve.csv")
    assert len(a) == 9 and a == b
    ma, mb = load_model(full.checkpoint), load_model(resumed.checkpoint)
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(v, w), k


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    from lamflow.model.training import loss as loss_mod

    real = loss_mod.EnergyLoss.__call__
    calls = {"n": 0}

    def diverging(self, model, batch, coef, training=True):  # the 6th training step diverges
        loss, m = real(self, model, batch, coef, training)
        calls["n"] += training
        return (loss * float("nan") if calls["n"] == 6 else loss), m

    monkeypatch.setattr(loss_mod.EnergyLoss, "__call__", diverging)
    cfg = load_train_config(write_config(tmp_path, steps=20, lr=0.005, batch=4))
    with pytest.raises(TrainingError, match=r"^step 5: loss is nan on task 'default' \(lr .*\); last good checkpoint"):
        train(cfg, tmp_path / "out", log=lambda *a: None)


def test_cli_train_and_test_one_line_errors(tmp_path, capsys):
    cfg = write_config(tmp_path, steps=10, lr=0.005, batch=4)
    assert main(["train", str(cfg), "-o", str(tmp_path / "o")]) == 0
    assert main(["test", "-m", str(tmp_path / "o" / "model.ckpt"), "-s", str(data_path("ch4_pbe", "valid")),
                 "-o", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["overall"]["nframes"] == 60 and (tmp_path / "t" / "parity.png").stat().st_size > 1000
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {type_map: [H], descriptor: {type: se_e2_a, rcutt: 6}}\ntraining: {training_data: {systems: x}}\n")
    assert main(["train", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"lamflow train: error: {bad}: model.descriptor.rcutt: unknown key"
    bad.write_text("model: [unclosed\n")
    assert main(["train", str(bad)]) == 1
    assert "malformed YAML" in capsys.readouterr().err


def test_config_rejects_bad_values_with_key_path(tmp_path):
    p = write_config(tmp_path, descriptor={"type": "se_e2_a", "rcut": 3.0, "rcut_smth": 4.0})
    with pytest.raises(ConfigError, match=r"model\.descriptor: Value error, rcut_smth 4.0 must be < rcut 3.0"):
        load_train_config(p)


def test_loader_workers_do_not_change_the_run(tmp_path):
    runs = []
    for workers in (0, 2):
        cfg = load_train_config(write_config(tmp_path, steps=12, lr=0.005, batch=4, disp_freq=4, save_freq=6,
                                             num_workers=workers))
        runs.append(train(cfg, tmp_path / f"w{workers}", log=lambda *a: None))
    rows = [[{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")} for r in
             __import__("csv").DictReader((r.out_dir / "lcurve.csv").read_text().splitlines())] for r in runs]
    assert rows[0] == rows[1] and len(rows[0]) == 4
    for (k, v), (_, w) in zip(load_model(runs[0].checkpoint).state_dict().items(),
                              load_model(runs[1].checkpoint).state_dict().items()):
        assert torch.equal(v, w), k


def test_a_frame_with_more_neighbours_than_sel_met_in_training_names_system_and_frame(tmp_path, monkeypatch):
    """sel: auto comes from a sample; a denser frame outside it stops training with one line."""
    import shutil

    from lamflow.model.data.batch import DataSet
    from lamflow.model.errors import DataError
    from lamflow.model.training import stats

    monkeypatch.setattr(stats, "NEIGHBOR_FRAMES", 8)
    p = tmp_path / "water"
    shutil.copytree(data_path("water_h2o", "valid"), p)
    systems = load_systems(str(p), ["O", "H"], lazy=True)
    sampled = set(stats.neighbor_frames(systems, 1)[0]) | set(stats.stat_frames(DataSet(systems, [], 1, torch.float64), 1, 1)[0])
    k = next(k for k in range(80) if k not in sampled)
    for name in ("coord", "box"):  # frame k compressed to 0.8 of its size: about twice the neighbours
        f = p / "set.000" / f"{name}.npy"
        a = np.load(f)
        a[k] *= 0.8
        f.chmod(0o644)
        np.save(f, a)
    cfg = {"model": {"type_map": ["O", "H"], "data_stat_nbatch": 1,
                     "descriptor": {"type": "se_e2_a", "rcut": 3.0, "rcut_smth": 0.5, "sel": "auto", "neuron": [4, 8],
                                    "axis_neuron": 2, "seed": 1},
                     "fitting_net": {"neuron": [8], "seed": 1}},
           "training": {"training_data": {"systems": str(p), "batch_size": 1}, "numb_steps": 100, "seed": 1,
                        "disp_freq": 100, "save_freq": 100}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match=rf"^{p} frame {k}: atom \d+ has \[\d+, \d+\] neighbours within rcut but sel is "
                                        rf"\[\d+, \d+\]; raise sel or use sel: auto$"):
        train(load_train_config(tmp_path / "t.yaml"), tmp_path / "out", log=lambda *a: None)

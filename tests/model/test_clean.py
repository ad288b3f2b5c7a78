"""Data cleaning on real data made bad on purpose (ch4_pbe/train copied, then one frame broken):
each rule drops exactly the broken frame with its reason and value, clean data loses nothing,
coverage and zero-shot errors of a pretrained model, and the `lamflow clean` command."""

import json
import shutil

import numpy as np
import pytest
from conftest import data_path

from lamflow.model.data.systems import load_systems
from lamflow.model.errors import ConfigError, DataError
from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.tasks.clean import CleanConfig, clean
from lamflow.workflows.cli import main

QUIET = dict(log=lambda *a: None)


def ch4_copy(tmp_path, name="ch4"):
    dst = tmp_path / name
    shutil.copytree(data_path("ch4_pbe", "train"), dst)
    return dst


def edit(system, key, fn):
    f = system / "set.000" / f"{key}.npy"
    a = np.load(f).astype(np.float64)
    a = fn(a)
    np.save(f, a)


def nan_force(a):
    a[10, 4] = np.nan
    return a


def huge_force(a):
    a[20, 6] = 1.0e4
    return a


def shift_energy(a):
    a = a.reshape(-1)
    a[30] += 10.0
    return a


def overlap(a):  # atom 1 onto atom 0, 0.1 A away
    a = a.reshape(len(a), -1, 3)
    a[50, 1] = a[50, 0] + [0.1, 0.0, 0.0]
    return a.reshape(len(a), -1)


def duplicate_frame_40(system):
    for f in (system / "set.000").glob("*.npy"):
        a = np.load(f)
        np.save(f, np.concatenate([a, a[40:41]]))


@pytest.mark.parametrize("corrupt, frame, reason, value", [
    (("force", nan_force), 10, "non_finite", None),
    (("force", huge_force), 20, "max_force", 1.0e4),
    (("energy", shift_energy), 30, "energy_outlier", None),
    (("coord", overlap), 50, "min_distance", 0.1),
    ("duplicate", 240, "duplicate", 0.0),
])
def test_clean_drops_exactly_the_broken_frame_with_its_reason(tmp_path, corrupt, frame, reason, value):
    src = ch4_copy(tmp_path)
    if corrupt == "duplicate":
        duplicate_frame_40(src)
    else:
        edit(src, *corrupt)
    res = clean([str(src)], tmp_path / "out", **QUIET)
    drops = res.report["dropped_frames"]
    assert [(d["frame"], d["reason"]) for d in drops] == [(frame, reason)], drops
    if value is not None:
        assert drops[0]["value"] == pytest.approx(value, rel=1e-6, abs=1e-9)
    if reason == "energy_outlier":
        assert drops[0]["value"] > 100  # 10 eV on 5 atoms against a spread of a few meV/atom
    if reason == "duplicate":
        assert drops[0]["detail"] == "of ch4 frame 40"
    assert res.dropped == 1 and res.kept == 240 - (reason != "duplicate")
    assert res.report["counts_by_reason"][reason] == 1
    out = load_systems([str(p) for p in res.systems], ["H", "C"])
    assert sum(s.nframes for s in out) == res.kept and all(np.isfinite(s.force).all() for s in out)


def test_clean_keeps_every_frame_of_clean_real_data(tmp_path):
    res = clean([str(data_path("ch4_pbe", "train")), str(data_path("water_h2o", "valid"))], tmp_path / "out", **QUIET)
    assert res.dropped == 0 and res.kept == 240 + 80, res.report["dropped_frames"]
    assert [r["name"] for r in res.report["systems"]] == ["ch4_pbe/train", "water_h2o/valid"]
    # the first MD steps of ch4 share coordinates but not forces: kept, counted as similar
    assert res.report["similar"]["count"] > 0
    written = load_systems([str(p) for p in res.systems], ["H", "C", "O"])
    orig = load_systems(str(data_path("ch4_pbe", "train")), ["H", "C", "O"])[0]
    np.testing.assert_allclose(written[0].force, orig.force)
    np.testing.assert_allclose(written[0].energy, orig.energy)
    assert (tmp_path / "out" / "clean.png").stat().st_size > 1000


def test_clean_every_rule_at_once_lists_each_frame_with_reason_and_value(tmp_path):
    src = ch4_copy(tmp_path, "bad")
    edit(src, "force", nan_force)
    edit(src, "force", huge_force)
    edit(src, "energy", shift_energy)
    edit(src, "coord", overlap)
    duplicate_frame_40(src)
    res = clean([str(src)], tmp_path / "out", **QUIET)
    got = {(d["system"], d["frame"], d["reason"]) for d in res.report["dropped_frames"]}
    assert got == {("bad", 10, "non_finite"), ("bad", 20, "max_force"), ("bad", 30, "energy_outlier"),
                   ("bad", 50, "min_distance"), ("bad", 240, "duplicate")}
    saved = json.loads(res.report_json.read_text())
    assert saved["dropped"] == 5 and saved["kept"] == 236
    nan_drop = next(d for d in saved["dropped_frames"] if d["reason"] == "non_finite")
    assert nan_drop["detail"] == "force contains NaN"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| bad | 241 | 236 | 5 |" in md and "| bad | 20 | max_force | 1e+04 |" in md


def test_clean_thresholds_come_from_the_config(tmp_path):
    src = ch4_copy(tmp_path)
    res = clean([str(src)], tmp_path / "out", CleanConfig(max_force=1.0), **QUIET)
    f = np.linalg.norm(load_systems(str(src), ["H", "C"])[0].force, axis=-1).max(axis=1)
    assert res.dropped == int((f > 1.0).sum()) > 0
    assert {d["reason"] for d in res.report["dropped_frames"]} == {"max_force"}


def test_min_distance_sees_periodic_images(tmp_path):
    src = ch4_copy(tmp_path)
    box = np.load(src / "set.000" / "box.npy").reshape(-1, 3, 3)

    def across_the_boundary(a):  # atom 1 is 0.2 A from atom 0 only through the periodic boundary
        a = a.reshape(len(a), -1, 3)
        a[60, 0] = [0.1, 1.0, 1.0]
        a[60, 1] = [0.1 + box[60, 0, 0] - 0.2, 1.0, 1.0]
        return a.reshape(len(a), -1)

    edit(src, "coord", across_the_boundary)
    res = clean([str(src)], tmp_path / "out", **QUIET)
    (d,) = res.report["dropped_frames"]
    assert (d["frame"], d["reason"]) == (60, "min_distance") and d["value"] == pytest.approx(0.2, abs=1e-5)


def tiny_model(type_map, seed=1):
    cfg = ModelConfig.model_validate({
        "type_map": type_map,
        "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [4, 4], "neuron": [4, 8], "axis_neuron": 2,
                       "seed": seed},
        "fitting_net": {"neuron": [8], "seed": seed}})
    return EnergyModel(cfg)


def test_zero_shot_refits_the_bias_and_reports_per_frame_errors(tmp_path):
    save_model(tiny_model(["H", "C"]), tmp_path / "pre.ckpt")
    res = clean([str(data_path("ch4_pbe", "valid"))], tmp_path / "out", pretrained=str(tmp_path / "pre.ckpt"), **QUIET)
    zs = json.loads((tmp_path / "out" / "zero_shot.json").read_text())
    errs = np.array(zs["frames"]["valid"]["e_per_atom"])
    assert len(errs) == 60 and abs(errs.mean()) < 1e-9  # one composition: the refit bias removes the mean error
    assert zs["overall"]["rmse_e_per_atom"] == pytest.approx(np.sqrt(np.mean(errs**2)))
    assert set(zs["bias_delta"]) == {"H", "C"} and len(zs["frames"]["valid"]["rmse_f"]) == 60
    assert res.report["coverage"]["uncovered"] == []
    assert (tmp_path / "out" / "zero_shot_parity.png").stat().st_size > 1000


def test_coverage_names_the_elements_a_pretrained_model_lacks(tmp_path):
    save_model(tiny_model(["O", "H"]), tmp_path / "water.ckpt")
    res = clean([str(data_path("ch4_pbe", "valid"))], tmp_path / "out", pretrained=str(tmp_path / "water.ckpt"), **QUIET)
    assert res.report["coverage"] == {"data_elements": ["H", "C"], "model_type_map": ["O", "H"], "uncovered": ["C"]}
    assert res.report["zero_shot"]["skipped"] == ["valid"]
    assert "not covered by the pretrained model: C" in (tmp_path / "out" / "report.md").read_text()


def test_clean_errors_name_the_path_before_any_work(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: no such file or directory"):
        clean([str(tmp_path / "nowhere")], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"active.model: needed"):
        clean([str(data_path("ch4_pbe", "valid"))], tmp_path / "out", CleanConfig.model_validate({"active": {}}))
    assert not (tmp_path / "out").exists()


def test_cli_clean_exit_codes_and_one_line_errors(tmp_path, capsys):
    src = ch4_copy(tmp_path)
    edit(src, "energy", shift_energy)
    assert main(["clean", str(src), "-o", str(tmp_path / "out"), "--min-distance", "0.8"]) == 0
    assert "kept 239, dropped 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "clean.json").read_text())["config"]["min_distance"] == 0.8

    assert main(["clean", str(tmp_path / "missing"), "-o", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert err == f"lamflow clean: error: {tmp_path / 'missing'}: no such file or directory\n"

    cfg = tmp_path / "clean.yaml"
    cfg.write_text("max_forse: 10\n")
    assert main(["clean", str(src), "-c", str(cfg), "-o", str(tmp_path / "o3")]) == 1
    assert capsys.readouterr().err == f"lamflow clean: error: {cfg}: max_forse: unknown key\n"

    assert main(["clean", str(src), "--pretrained", str(tmp_path / "none.ckpt"), "-o", str(tmp_path / "o4")]) == 1
    assert capsys.readouterr().err.strip().endswith("none.ckpt: no such file")

"""Every error next to its composition-only baseline (LAMBench's dummy model), in words when a model
is not better; LAMBench-style stability and efficiency of the test stage; the cells they run on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import data_path

from lamflow.model.data.systems import System, load_systems
from lamflow.model.io.payload import save_model
from lamflow.model.nn.config import ModelConfig
from lamflow.model.nn.potential import EnergyModel
from lamflow.model.tasks.baseline import baseline_errors, fit_baseline
from lamflow.model.tasks.lambench import grow, stability
from lamflow.model.tasks.report import NOT_BETTER, verdicts
from lamflow.ops.common import stage_dataset


def quiet(*a, **k):
    pass


def untrained(type_map, seed=1):
    """Random weights, no statistics, no energy bias: a model that learned nothing."""
    return EnergyModel(ModelConfig.model_validate({
        "type_map": type_map,
        "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [4, 1], "neuron": [4, 8],
                       "axis_neuron": 2, "seed": seed},
        "fitting_net": {"neuron": [8], "seed": seed}}))


def test_baseline_recovers_per_element_energies_and_predicts_zero_forces():
    rng = np.random.default_rng(0)
    e_true = np.array([-3.0, -7.5])  # eV per H, per C
    systems = []
    for counts in ([4, 1], [2, 2], [6, 2]):
        atype = np.repeat([0, 1], counts)
        n = 5
        energy = np.full(n, float(np.bincount(atype, minlength=2) @ e_true)) + rng.normal(0, 1e-3, n)
        systems.append(System(f"s{counts}", ["H", "C"], atype, rng.normal(size=(n, len(atype), 3)), None, energy,
                              rng.normal(size=(n, len(atype), 3))))
    base = fit_baseline(systems, 2)
    assert base.ncompositions == 3 and base.e_per_type == pytest.approx(e_true, abs=2e-3)
    errs = baseline_errors(base, systems)
    f = np.concatenate([s.force.reshape(-1) for s in systems])
    assert errs["overall"]["rmse_f"] == pytest.approx(np.sqrt(np.mean(f**2)))  # zero forces: RMSE = RMS of DFT forces
    assert errs["overall"]["rmse_e_per_atom"] < 1e-3


def test_untrained_model_is_flagged_not_better_than_baseline_in_words(tmp_path):
    from lamflow.ops.report import run_report
    from lamflow.ops.test import run_test

    data = tmp_path / "data"
    stage_dataset(data, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))]})
    save_model(untrained(["H", "C"]), tmp_path / "m" / "model.ckpt")
    s = run_test(data, "ch4", tmp_path / "m", tmp_path / "t", transfer={"stability": {"structures": 1, "steps": 5},
                                                                       "efficiency": {"natoms": 100, "repeats": 1}},
                 log=quiet)
    assert s["split"] == "valid" and s["normalised"]["rmse_f"]["ratio"] >= 1 and s["normalised"]["rmse_e_per_atom"]["ratio"] > 1
    assert any(f.startswith("ch4: fine-tuned F RMSE") and NOT_BETTER in f for f in s["flags"]), s["flags"]
    assert s["efficiency"]["natoms"] >= 100 and s["efficiency"]["us_per_atom"] > 0
    assert s["stability"]["total"] == 1
    base = json.loads((tmp_path / "t" / "baseline.json").read_text())["overall"]
    assert s["baseline"]["rmse_f"] == pytest.approx(base["rmse_f"])
    run_report(tmp_path / "r", title="t", tests=[tmp_path / "t"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "ch4: fine-tuned F RMSE" in md and f"is {NOT_BETTER}" in md and f"**{NOT_BETTER}**" in md


def test_test_stage_uses_the_held_out_test_split_when_given(tmp_path):
    from lamflow.ops.test import run_test

    data = tmp_path / "data"
    valid = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0]
    stage_dataset(data, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))],
                                "test": [str(data_path("ch4_pbe", "train"))]})
    save_model(untrained(["H", "C"]), tmp_path / "m.ckpt")
    s = run_test(data, "ch4", tmp_path / "m.ckpt", tmp_path / "t", transfer={}, log=quiet)
    assert s["split"] == "test" and s["nframes"] == 240 != valid.nframes  # the test split only, not valid + test


def test_verdicts_name_fine_tuning_worse_than_zero_shot_and_unstable_runs():
    s = {"system": "w", "role": "fine-tuned", "model": {"rmse_e_per_atom": 0.002, "rmse_f": 0.1},
         "zero_shot": {"rmse_e_per_atom": 0.001, "rmse_f": 0.2},
         "normalised": {"rmse_f": {"model": 0.1, "baseline": 0.8, "ratio": 0.125}},
         "stability": {"stable": 1, "total": 3, "tolerance": 5e-4}}
    v = verdicts(s)
    assert any("fine-tuning is worse than zero-shot in E RMSE (2.00 vs 1.00 meV/atom)" in x for x in v), v
    assert any("2 of 3 NVE runs unstable" in x for x in v) and not any(NOT_BETTER in x for x in v)


def test_grow_replicates_a_periodic_cell_and_spaces_molecules_beyond_rcut():
    ch4 = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0]
    coord, box, atype = grow(ch4, 500, 4.0)
    assert len(atype) >= 500 and len(atype) % 5 == 0 and coord.shape == (len(atype), 3)
    assert np.linalg.det(box) == pytest.approx(np.linalg.det(ch4.box[0]) * (len(atype) // 5), rel=1e-9)
    mol = System("m", ["H", "C"], ch4.atype, ch4.coord[:1], None)
    coord, box, atype = grow(mol, 1000, 4.0)
    assert box is None and len(atype) == 1000
    far = coord.reshape(-1, 5, 3)
    gap = np.linalg.norm(far[0][:, None] - far[1][None], axis=-1).min()
    assert gap > 4.0  # copies do not see each other


def test_stability_counts_a_failed_run_as_unstable(monkeypatch):
    from lamflow.model.tasks import md
    from lamflow.model.tasks.md import SimulationError

    def blow_up(*a, **k):
        raise SimulationError("step 3: potential energy is nan")

    monkeypatch.setattr(md, "run_md", blow_up)
    ch4 = load_systems(str(data_path("ch4_pbe", "valid")), ["H", "C"])[0]
    r = stability(untrained(["H", "C"]), [ch4], structures=2, steps=5, log=quiet)
    assert r["stable"] == 0 and r["total"] == 2 and r["stable_fraction"] == 0.0
    assert all("potential energy is nan" in run["error"] for run in r["runs"])


def test_pretraining_heads_stand_next_to_their_baseline_and_an_untrained_one_is_named(tmp_path):
    """The pretrain OP puts each energy head's validation errors next to its dataset's dummy model
    (the same `normalised` layout as the test stage); the run report flags a head that is not
    better in words, and says so when every head is."""
    from lamflow.model.tasks.baseline import dataset_baseline
    from lamflow.ops.pretrain import _with_baselines
    from lamflow.ops.report import run_report

    ch4 = data_path("ch4_pbe")
    tm = ["H", "C"]
    base = dataset_baseline([str(ch4 / "train")], [str(ch4 / "valid")], tm)
    assert base["nframes"] > 0 and base["rmse_e_per_atom"] > 0 and base["rmse_f"] > 0
    paths = {"ch4": {"train": [str(ch4 / "train")], "valid": [str(ch4 / "valid")], "fmt": "auto"}}
    good = _with_baselines({"ch4": {"rmse_e_per_atom": 0.5 * base["rmse_e_per_atom"], "rmse_f": 0.2 * base["rmse_f"]}},
                           paths, tm)["ch4"]
    assert good["nframes"] == base["nframes"]
    assert good["normalised"]["rmse_e_per_atom"]["ratio"] == pytest.approx(0.5)
    assert good["normalised"]["rmse_f"]["ratio"] == pytest.approx(0.2)
    untrained = _with_baselines({"ch4": {"rmse_e_per_atom": 2 * base["rmse_e_per_atom"], "rmse_f": base["rmse_f"]}},
                                paths, tm)["ch4"]

    def report(head, name, **more):
        pre = tmp_path / name
        pre.mkdir()
        (pre / "summary.json").write_text(json.dumps({"kind": "multi-task", "steps": 4, "heads": {"ch4": head, **more}}))
        summary = run_report(tmp_path / f"{name}-report", title="t", pretrain=pre)
        return summary, (tmp_path / f"{name}-report" / "report.md").read_text()

    summary, md = report(untrained, "untrained")
    assert [f for f in summary["flags"] if "ch4: pretrained head E RMSE" in f and NOT_BETTER in f]
    assert [f for f in summary["flags"] if "ch4: pretrained head F RMSE" in f and NOT_BETTER in f]  # ratio 1.0
    assert "**Not better than its baseline:**" in md and "| ch4 | pretrained head |" in md
    summary, md = report(good, "good", crystals={"rmse_coord": 0.1234, "acc_type": 0.9})  # + a label-free denoise head
    assert summary["flags"] == [] and "Every energy head is better than its baseline." in md
    assert "| crystals | 0.1234 | 0.900 |" in md  # the denoise head in its own table, not as "E -, F -"
    assert "crystals: denoise coord RMSE 0.123 A, type accuracy 0.90" in md and "(0.20x baseline)" in md

"""Distillation: a se_atten teacher (trained briefly on ch4_pbe) explores with MD, labels frames,
and a se_e2_a student learns them; the outputs exist, the counts add up, the trust check drops
and counts frames, and the student's errors against the teacher and DFT are reported."""

import json

import numpy as np
import pytest
import yaml
from conftest import data_path

from lamflow.model.data.systems import load_systems
from lamflow.model.errors import ConfigError, DataError
from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.model.tasks.compress import compress
from lamflow.model.tasks.distill import DistillConfig, distill, load_distill_config
from lamflow.model.tasks.explore import Counts, ExplorationConfig, Frames, LabellingConfig, dedup, explore, label
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.trainer import train
from lamflow.workflows.cli import main

CH4 = data_path("ch4_pbe")

CONFIG = {
    "exploration": {"temperatures": [300, 800], "steps": 30, "timestep": 0.5, "sample_every": 5, "perturb": 0.02,
                    "strains": [0.0, 0.02], "max_frames": 20},
    "labelling": {"batch_size": 4},
    "student": {"model": {"descriptor": {"rcut": 4.0, "sel": [8, 4], "neuron": [4, 8], "axis_neuron": 2, "seed": 2},
                          "fitting_net": {"neuron": [16, 16], "seed": 2}},
                "learning_rate": {"start_lr": 0.005, "stop_lr": 1e-4, "decay_steps": 10},
                "loss": {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 100, "limit_pref_f": 10},
                "training": {"numb_steps": 60, "batch_size": 4, "disp_freq": 30, "seed": 3}},
    "test_fraction": 0.2,
    "seed": 4,
}



def train_teacher(out, seed=1, steps=100):
    cfg = TrainConfig.model_validate({
        "model": {"type_map": ["H", "C"],
                  "descriptor": {"type": "se_atten", "rcut": 4.0, "rcut_smth": 0.5, "sel": 8, "neuron": [4, 8],
                                 "axis_neuron": 2, "tebd_dim": 4, "attn": 8, "attn_layer": 1, "seed": seed},
                  "fitting_net": {"neuron": [16, 16], "seed": seed}},
        "learning_rate": {"start_lr": 0.005, "stop_lr": 1e-4, "decay_steps": 10},
        "loss": {"start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 100, "limit_pref_f": 10},
        "training": {"training_data": {"systems": str(CH4 / "train"), "batch_size": 8}, "numb_steps": steps, "seed": seed,
                     "disp_freq": 50, "save_freq": steps}})
    return train(cfg, out, log=lambda *a: None).checkpoint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = train_teacher(tmp_path_factory.mktemp("teacher") / "t")
    return path


@pytest.fixture(scope="module")
def frames(teacher):
    counts = Counts()
    model = load_model(teacher)
    start = load_systems(str(CH4 / "valid"), model.type_map, labeled=False)
    cfg = ExplorationConfig(temperatures=[400], steps=20, timestep=0.5, sample_every=2)
    return explore(model, start, cfg, counts, seed=0, log=lambda *a: None), counts


def test_distill_cli_writes_student_data_and_report_with_consistent_counts(teacher, tmp_path, capsys):
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "d"
    assert main(["distill", "-t", str(teacher), "-s", str(CH4 / "valid"), "-c", str(cfg), "-o", str(out),
                 "--dft-train", str(CH4 / "train"), "--dft-valid", str(CH4 / "valid")]) == 0
    assert "held-out frames" in capsys.readouterr().out
    report = json.loads((out / "distill.json").read_text())
    c = report["counts"]
    # 2 strains x 2 temperatures, 7 samples each (steps 0, 5, ..., 30)
    assert c["md_runs"] == 4 and c["md_runs_failed"] == 0 and c["sampled"] == 28
    assert c["over_max_frames"] == 28 - c["duplicates"] - 20 > 0
    assert c["sampled"] == c["duplicates"] + c["over_max_frames"] + c["dropped_max_force"] + c["dropped_disagreement"] \
        + c["train_frames"] + c["test_frames"]
    assert c["labelled"] == c["train_frames"] + c["test_frames"] and c["test_frames"] >= 1
    # written data: deepmd/npy with teacher labels, readable by lamflow
    tr = load_systems(str(out / "data" / "train"), ["H", "C"])
    te = load_systems(str(out / "data" / "test"), ["H", "C"])
    assert sum(s.nframes for s in tr) == c["train_frames"] and sum(s.nframes for s in te) == c["test_frames"]
    assert tr[0].virial is not None and (out / "data" / "train" / "sys.000" / "type_map.raw").read_text().split() == ["H", "C"]
    a0 = load_systems(str(CH4 / "valid"), ["H", "C"])[0].box[0, 0, 0]
    cells = {round(float(b[0, 0] / a0), 6) for s in tr + te for b in s.box}
    assert cells == {1.0, 1.02}  # the strained runs explored a 2 % larger cell
    tmodel = load_model(teacher)
    from lamflow.model.nn.infer import evaluate

    lab = evaluate(tmodel, te[0].coord, te[0].box, te[0].atype)
    np.testing.assert_allclose(lab["energy"], te[0].energy, atol=1e-8)  # labels are the teacher's
    np.testing.assert_allclose(lab["force"], te[0].force, atol=1e-8)
    # the student: se_e2_a, errors vs teacher and vs DFT reported with parity plots
    student = load_model(out / "student" / "model.ckpt")
    assert student.cfg.descriptor.type == "se_e2_a" and student.type_map == ["H", "C"]
    for key in ("student_vs_teacher", "student_vs_dft", "teacher_vs_dft"):
        m = report[key]
        assert np.isfinite(m["rmse_e_per_atom"]) and np.isfinite(m["rmse_f"]) and m["rmse_f"] > 0
        assert (out / "report" / key / "parity.png").stat().st_size > 1000
    assert report["student_vs_teacher"]["nframes"] == c["test_frames"] and report["student_vs_dft"]["nframes"] == 60
    assert report["student"]["train"]["steps"] == 60
    # the student checkpoint carries min_nbor_dist, so it compresses without its data
    from lamflow.model.data.batch import min_neighbor_distance

    d = read_checkpoint(out / "student" / "model.ckpt")["min_nbor_dist"]
    assert d == pytest.approx(min_neighbor_distance(tr + te + load_systems(str(CH4 / "train"), ["H", "C"]), 4.0))
    assert compress(out / "student" / "model.ckpt", tmp_path / "c.ckpt", log=lambda *a: None).min_nbor_dist == d


def test_trust_check_drops_and_counts_frames_over_max_force(teacher, frames):
    explored, _ = frames
    model = load_model(teacher)
    n = sum(len(f) for f in explored)
    counts = Counts()
    out, _ = label(model, explored, LabellingConfig(trust={"max_force": 1e-6}), counts, log=lambda *a: None)
    assert out == [] and counts.dropped_max_force == n and counts.labelled == 0
    # a bound between the smallest and largest max force drops some frames only
    labelled, _ = label(model, explored, LabellingConfig(), Counts(), log=lambda *a: None)
    fmax = np.linalg.norm(labelled[0].force, axis=-1).max(axis=-1)
    srt = np.sort(fmax)
    bound = float(0.5 * (srt[len(srt) // 2] + srt[len(srt) // 2 + 1]))  # between two frames, not at one
    counts = Counts()
    kept, _ = label(model, explored, LabellingConfig(batch_size=3, trust={"max_force": bound}), counts, log=lambda *a: None)
    assert counts.dropped_max_force == int((fmax > bound).sum()) > 0
    assert counts.labelled == kept[0].nframes == n - counts.dropped_max_force
    assert np.linalg.norm(kept[0].force, axis=-1).max() <= bound


def test_trust_check_drops_frames_where_two_teachers_disagree(teacher, frames, tmp_path):
    explored, _ = frames
    model = load_model(teacher)
    other = load_model(train_teacher(tmp_path / "t2", seed=7, steps=20))
    counts = Counts()
    cfg = LabellingConfig(trust={"second_teacher": "unused-here", "max_force_disagreement": 1e-6})
    out, dev = label(model, explored, cfg, counts, second=other, log=lambda *a: None)
    n = sum(len(f) for f in explored)
    assert out == [] and counts.dropped_disagreement == n and dev["max"] >= dev["mean"] > 1e-6
    counts = Counts()
    cfg = LabellingConfig(trust={"second_teacher": "unused-here", "max_force_disagreement": 1e3})
    out, _ = label(model, explored, cfg, counts, second=other, log=lambda *a: None)
    assert counts.dropped_disagreement == 0 and counts.labelled == n


def test_distill_with_every_frame_untrusted_fails_with_the_counts(teacher, tmp_path):
    cfg = DistillConfig.model_validate({**CONFIG, "labelling": {"trust": {"max_force": 1e-9}},
                                        "exploration": {"temperatures": [300], "steps": 4, "sample_every": 2}})
    with pytest.raises(DataError, match=r"none of the 3 explored frames survived .*dropped by max_force 3"):
        distill(teacher, [str(CH4 / "valid")], cfg, tmp_path / "d", log=lambda *a: None)


def test_dedup_drops_near_identical_frames_only():
    rng = np.random.default_rng(0)
    a = rng.random((4, 3)) * 5
    fr = Frames("s", ["H", "C"], np.array([0, 0, 1, 1]))
    for c in (a, a + 1e-5, a + 0.1, a, a + 0.1 + 2e-4):
        fr.coord.append(c)
        fr.box.append(np.eye(3) * 10)
    assert dedup(fr, 1e-3) == 3 and len(fr) == 2
    np.testing.assert_array_equal(fr.coord[1], a + 0.1)


def test_distill_config_errors_name_the_key(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text(yaml.safe_dump({"exploration": {"temperature": [300]}}))
    with pytest.raises(ConfigError, match=r"d.yaml: exploration.temperature: unknown key"):
        load_distill_config(p)
    p.write_text(yaml.safe_dump({"labelling": {"trust": {"second_teacher": "x.ckpt"}}}))
    with pytest.raises(ConfigError, match="second_teacher and max_force_disagreement go together"):
        load_distill_config(p)
    p.write_text(yaml.safe_dump({"student": {"model": {"descriptor": {"type": "se_atten"}}}}))
    with pytest.raises(ConfigError, match="student.model.descriptor.type"):
        load_distill_config(p)

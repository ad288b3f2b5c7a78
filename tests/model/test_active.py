"""Active-learning selection: the frames moved into the training set are the ones the previous
round's model gets most wrong; the learning curve and the selected set are written; fine-tuning
from a pretrained model starts the curve with its zero-shot point. Tiny models, 2 rounds."""

import json

import numpy as np
import pytest
from conftest import data_path

from lamflow.model.data.systems import load_systems
from lamflow.model.errors import ConfigError
from lamflow.model.io.checkpoint import load_model
from lamflow.model.nn.infer import evaluate_system
from lamflow.model.tasks.active import ActiveConfig, active_learning, force_deviation, frame_force_errors, select_worst

MODEL = {"type_map": ["H", "C"],
         "descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [4, 1], "neuron": [4, 8],
                        "axis_neuron": 2, "seed": 1},
         "fitting_net": {"neuron": [8, 8], "seed": 1}}


def config(**kw):
    base = {"ratio_init": 0.25, "ratio_selected": [0.25], "numb_steps": 15, "batch_size": 2, "model": MODEL,
            "learning_rate": {"start_lr": 0.005, "stop_lr": 0.0005, "decay_steps": 5}, "device": "cpu"}
    return ActiveConfig.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def ch4_40():
    return [load_systems(str(data_path("ch4_pbe", "train")), ["H", "C"])[0].subset(np.arange(0, 240, 6))]


def test_select_worst_takes_the_largest_scores_globally_or_per_system():
    scores = [np.array([0.1, 0.9, 0.5]), np.array([0.8, 0.2])]
    pool = [np.array([3, 7, 9]), np.array([0, 4])]
    got = select_worst(scores, pool, 2, per_system=False)
    assert [g.tolist() for g in got] == [[7], [0]]
    got = select_worst(scores, pool, [2, 1], per_system=True)
    assert [g.tolist() for g in got] == [[7, 9], [0]]


def test_force_deviation_is_the_max_atomic_std_over_models():
    f0 = np.zeros((2, 3, 3))
    f1 = np.zeros((2, 3, 3))
    f1[1, 2] = [2.0, 0, 0]  # frame 1, atom 2: models disagree by 2 eV/A -> std 1
    np.testing.assert_allclose(force_deviation([f0, f1]), [0.0, 1.0])
    err = frame_force_errors(f1, f0, "rmse_f")
    np.testing.assert_allclose(err, [0.0, np.sqrt(4 / 9)])
    np.testing.assert_allclose(frame_force_errors(f1, f0, "max_f"), [0.0, 2.0])


def test_active_learning_adds_the_frames_the_model_gets_most_wrong(ch4_40, tmp_path):
    res = active_learning(ch4_40, tmp_path / "al", config(), log=lambda *a: None)
    report = json.loads(res.lcurve_json.read_text())
    # 40 frames: 4 held out, 36 candidates; ceil(0.25 * 36) = 9 random, then the 9 worst
    assert [p["nsamples"] for p in res.curve] == [9, 18] and report["curve"] == res.curve
    held = report["valid"][ch4_40[0].name]
    assert len(held) == 4 and all(p["nframes"] == 4 for p in res.curve)
    first = report["rounds"][0]
    added = first["added"][ch4_40[0].name]
    # recompute the ranking with the round-0 model: the added frames are the 9 worst left
    model = load_model(tmp_path / "al" / first["checkpoint"])
    s = ch4_40[0]
    pool = sorted(set(range(40)) - set(held) - set(report["selected"][s.name]) | set(added))
    err = frame_force_errors(evaluate_system(model, s.subset(pool))["force"], s.force[pool], "rmse_f")
    worst = sorted(np.array(pool)[np.argsort(-err)[:9]].tolist())
    assert added == worst
    assert set(added) <= set(report["selected"][s.name]) and not set(held) & set(report["selected"][s.name])
    assert sum(load_systems(str(p), ["H", "C"])[0].nframes for p in res.selected) == 18
    assert res.lcurve_png.stat().st_size > 1000 and res.model.is_file()


def test_active_learning_from_a_pretrained_model_starts_with_zero_shot(ch4_40, tmp_path):
    pre = active_learning(ch4_40, tmp_path / "pre", config(ratio_selected=[]), log=lambda *a: None).model
    res = active_learning(ch4_40, tmp_path / "ft", config(model=None, ratio_selected=[0.25], numb_steps=5),
                          pretrained=str(pre), log=lambda *a: None)
    assert [p["round"] for p in res.curve] == ["zero-shot", 0, 1]
    assert [p["nsamples"] for p in res.curve] == [0, 9, 18]
    assert res.curve[0]["rmse_f"] > 0


def test_active_learning_needs_a_model_or_a_pretrained_one(ch4_40, tmp_path):
    with pytest.raises(ConfigError, match="active.model: needed"):
        active_learning(ch4_40, tmp_path / "x", config(model=None))
    with pytest.raises(ConfigError, match=r"ratio_selected: Value error, every ratio must be in \(0, 1\]"):
        from lamflow.model.schema import parse_config
        from lamflow.model.tasks.clean import CleanConfig

        parse_config(CleanConfig, {"active": {"ratio_selected": [0.5, 2]}}, "clean.yaml")

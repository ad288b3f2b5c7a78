"""Stage OPs, called as plain functions (no dflow workflow) and through `execute` in a temp dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, data_path

from lamflow.model.io.checkpoint import load_model, read_checkpoint
from lamflow.ops.common import split_paths, stage_dataset


@pytest.fixture()
def staged(tmp_path) -> Path:
    root = tmp_path / "data"
    stage_dataset(root, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))]})
    return root


def quiet(*a, **k):
    pass


def test_staged_layout_round_trips_paths(staged):
    assert split_paths(staged, "ch4", "train") == [str(staged / "ch4" / "train" / "0")]
    assert split_paths(staged, "ch4", "test") == []
    assert (staged / "ch4" / "train" / "0" / "type.raw").is_file()


def test_pretrain_op_writes_a_loadable_model_and_summary(tmp_path, staged):
    from lamflow.ops.pretrain import run_pretrain

    out = tmp_path / "pretrain"
    s = run_pretrain(TINY, staged, ["ch4"], out, type_map=["H", "C"], log=quiet)
    model = load_model(out / "model.ckpt")
    assert list(model.type_map) == ["H", "C"]
    assert (out / "lcurve.csv").is_file() and (out / "summary.json").is_file()
    assert s["heads"]["ch4"]["rmse_f"] > 0 and s["steps"] == 4
    assert json.loads((out / "summary.json").read_text()) == s


def test_pretrain_resumes_from_the_checkpoint_left_in_resume_dir(tmp_path, staged):
    """A rerun of a killed training step continues from its last checkpoint instead of step 0."""
    from lamflow.ops.pretrain import run_pretrain

    resume = tmp_path / "resume"
    run_pretrain(TINY, staged, ["ch4"], tmp_path / "first", type_map=["H", "C"], resume_dir=str(resume), log=quiet)
    assert read_checkpoint(resume / "model.ckpt")["train_state"]["step"] == 4
    longer = json.loads(json.dumps(TINY))
    longer["training"]["numb_steps"] = 6
    lines = []
    run_pretrain(longer, staged, ["ch4"], tmp_path / "second", type_map=["H", "C"], resume_dir=str(resume), log=lines.append)
    assert any("restarting from" in ln and "at step 4" in ln for ln in lines), lines
    assert read_checkpoint(tmp_path / "second" / "model.ckpt")["train_state"]["step"] == 6


def test_test_op_reports_errors_on_the_test_split_when_given(tmp_path, staged):
    from lamflow.ops.pretrain import run_pretrain
    from lamflow.ops.test import run_test

    run_pretrain(TINY, staged, ["ch4"], tmp_path / "m", type_map=["H", "C"], log=quiet)
    stage_dataset(staged, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))],
                                  "test": [str(data_path("ch4_pbe", "valid"))]})
    s = run_test(staged, "ch4", tmp_path / "m", tmp_path / "t", log=quiet)
    assert s["nframes"] == 60 and s["split"] == "test"  # the held-out test split only, not valid + test
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["overall"]["rmse_f"] == pytest.approx(s["model"]["rmse_f"])
    assert (tmp_path / "t" / "parity.png").is_file()


def test_clean_op_drops_a_broken_frame_and_keeps_the_layout(tmp_path):
    from lamflow.ops.clean import run_clean

    bad = tmp_path / "raw" / "valid"
    shutil.copytree(data_path("ch4_pbe", "valid"), bad)
    f = bad / "set.000" / "force.npy"
    force = np.load(f)
    force.reshape(force.shape[0], -1)[3, 0] = np.nan
    np.save(f, force)
    data = tmp_path / "data"
    stage_dataset(data, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(bad)]})
    s = run_clean(data, ["ch4"], tmp_path / "cleaned", tmp_path / "report", type_map=["H", "C"], log=quiet)
    assert s["datasets"]["ch4"]["dropped"] == 1 and s["datasets"]["ch4"]["by_reason"] == {"non_finite": 1}
    from lamflow.model.data.systems import load_systems

    valid = load_systems(split_paths(tmp_path / "cleaned", "ch4", "valid"), ["H", "C"])
    assert sum(v.nframes for v in valid) == 59
    train = load_systems(split_paths(tmp_path / "cleaned", "ch4", "train"), ["H", "C"])
    assert sum(t.nframes for t in train) == s["datasets"]["ch4"]["kept"] - 59
    assert (tmp_path / "report" / "ch4" / "clean.json").is_file()


def test_report_gathers_stage_summaries_into_markdown(tmp_path, staged):
    from lamflow.ops.pretrain import run_pretrain
    from lamflow.ops.report import run_report
    from lamflow.ops.test import run_test

    run_pretrain(TINY, staged, ["ch4"], tmp_path / "pretrain", type_map=["H", "C"], log=quiet)
    run_test(staged, "ch4", tmp_path / "pretrain", tmp_path / "test-ch4", log=quiet)
    s = run_report(tmp_path / "report", title="t", pretrain=tmp_path / "pretrain", tests=[tmp_path / "test-ch4"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Pretraining" in md and "ch4" in md
    for line in md.splitlines():
        if line.startswith("!["):
            assert (tmp_path / "report" / line.split("(")[1].rstrip(")")).is_file()
    assert s["test"]["ch4"]["model"]["rmse_f"] > 0


def test_op_execute_turns_bad_input_into_a_fatal_error(tmp_path, staged, monkeypatch):
    from dflow.python import OPIO, FatalError

    from lamflow.ops.pretrain import Pretrain

    monkeypatch.chdir(tmp_path)
    bad = json.loads(json.dumps(TINY))
    bad["model"]["type_map"] = ["H"]  # the data hold C as well
    with pytest.raises(FatalError, match="not in the model type map"):
        Pretrain().execute(OPIO({"config": bad, "datasets": ["ch4"], "type_map": ["H"], "resume_dir": "", "data": staged,
                                 "cleaned": None}))


def test_fail_stage_env_makes_an_op_raise(tmp_path, staged, monkeypatch):
    from dflow.python import OPIO

    from lamflow.ops.test import Test

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAMFLOW_FAIL_STAGE", "test")
    monkeypatch.setenv("LAMFLOW_STEP_LOG", str(tmp_path / "ledger"))
    with pytest.raises(RuntimeError, match="failing on purpose"):
        Test().execute(OPIO({"system": "ch4", "branch": "", "data": staged, "cleaned": None, "model": tmp_path,
                             "pretrained": None}))
    assert (tmp_path / "ledger").read_text() == "test ch4\n"
    assert os.environ["LAMFLOW_FAIL_STAGE"] == "test"


DISTILL = {"exploration": {"steps": 10, "sample_every": 5, "max_frames": 12, "temperatures": [300.0]},
           "student": {"model": {"descriptor": {"rcut": 4.0, "rcut_smth": 0.5, "sel": [8, 4], "neuron": [4, 8], "axis_neuron": 2},
                                 "fitting_net": {"neuron": [8, 8]}},
                       "training": {"numb_steps": 4, "disp_freq": 2, "save_freq": 2, "batch_size": 2, "seed": 1}},
           "test_fraction": 0.25, "seed": 1}


def test_distill_then_compress_ops_give_a_faster_model_with_a_report(tmp_path, staged):
    from lamflow.ops.compress import run_compress
    from lamflow.ops.distill import run_distill
    from lamflow.ops.pretrain import run_pretrain

    run_pretrain(TINY, staged, ["ch4"], tmp_path / "teacher", type_map=["H", "C"], log=quiet)
    d = run_distill(DISTILL, tmp_path / "teacher", staged, "ch4", tmp_path / "distill", log=quiet)
    assert (tmp_path / "distill" / "model.ckpt").is_file() and (tmp_path / "distill" / "distill.json").is_file()
    assert d["counts"]["train_frames"] + d["counts"]["test_frames"] > 0
    assert d["student_vs_teacher"]["rmse_f"] >= 0 and d["student"]["rmse_f"] > 0 and d["teacher"]["rmse_f"] > 0
    c = run_compress({"stride": 0.02}, tmp_path / "distill", staged, "ch4", tmp_path / "compress", log=quiet)
    model = load_model(tmp_path / "compress" / "model.ckpt")
    assert getattr(model, "kind", "") == "compressed"
    assert c["max_abs_df"] < 1e-2 and c["speedup"] > 0
    assert json.loads((tmp_path / "compress" / "summary.json").read_text()) == c

    from lamflow.ops.report import run_report

    s = run_report(tmp_path / "report", title="t", distill=tmp_path / "distill", compress=tmp_path / "compress")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Distillation" in md and "## Compression" in md and "speed-up" in md
    assert s["compress"]["speedup"] == c["speedup"]


def test_compress_rejects_unknown_settings_in_one_line(tmp_path, staged):
    from lamflow.model.errors import ConfigError
    from lamflow.ops.compress import run_compress

    with pytest.raises(ConfigError, match=r"stages.compress.config: unknown key\(s\) strid"):
        run_compress({"strid": 0.1}, tmp_path, staged, "ch4", tmp_path / "c", log=quiet)


@pytest.fixture()
def two_heads(tmp_path) -> Path:
    """ch4 staged twice, as two pretraining datasets (two heads), plus chon for element checks."""
    root = tmp_path / "data2"
    for name in ("ch4a", "ch4b"):
        stage_dataset(root, name, {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))]})
    return root


def test_multitask_pretrain_gives_one_head_per_dataset_and_finetune_starts_from_it(tmp_path, two_heads):
    from lamflow.ops.finetune import run_finetune
    from lamflow.ops.pretrain import run_pretrain
    from lamflow.ops.test import run_test

    s = run_pretrain(TINY, two_heads, ["ch4a", "ch4b"], tmp_path / "pre", type_map=["H", "C"], log=quiet)
    assert s["kind"] == "multi-task" and set(s["heads"]) == {"ch4a", "ch4b"}
    payload = read_checkpoint(tmp_path / "pre" / "model.ckpt")
    assert payload["kind"] == "multitask" and set(payload["config"]["branches"]) == {"ch4a", "ch4b"}
    ft = {k: v for k, v in TINY.items() if k != "model"}  # the descriptor comes from the checkpoint
    f = run_finetune(ft, two_heads, "ch4b", tmp_path / "pre", tmp_path / "ft", type_map=["H", "C"], log=quiet)
    assert f["system"] == "ch4b" and f["metrics"]["rmse_f"] > 0 and f["steps"] == 4
    assert getattr(load_model(tmp_path / "ft" / "model.ckpt"), "kind", "") == "energy"
    t = run_test(two_heads, "ch4b", tmp_path / "ft", tmp_path / "t", pretrained=tmp_path / "pre", branch="ch4a", log=quiet)
    assert t["zero_shot"]["rmse_f"] > 0 and t["model"]["rmse_f"] > 0
    assert (tmp_path / "t" / "zero_shot" / "parity.png").is_file()

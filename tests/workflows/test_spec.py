"""The pipeline spec: schema, defaults, and every problem found before anything runs, one line
each with the YAML path."""

from __future__ import annotations

import copy
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import data_path

from lamflow.workflows.cli import main
from lamflow.workflows.spec import SpecError, check_spec, image_problems, load_spec, resolved_type_map

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {
    "model": {"descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": "auto", "neuron": [4, 8],
                             "axis_neuron": 2, "seed": 1},
              "fitting_net": {"neuron": [8, 8], "seed": 1}},
    "training": {"numb_steps": 4, "disp_freq": 2, "save_freq": 2, "seed": 1},
}


def write(tmp_path: Path, doc: dict | str, name: str = "pipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def ch4() -> dict:
    return {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}


def base_doc(**stages) -> dict:
    return {"name": "t", "datasets": {"ch4": ch4()},
            "stages": stages or {"pretrain": {"datasets": ["ch4"], **copy.deepcopy(TINY_MODEL)}, "test": {}}}


def problems_of(path: Path, data: bool = True) -> list[str]:
    try:
        return check_spec(load_spec(path), data=data)
    except SpecError as e:
        return e.problems


def test_spec_defaults_leave_unlisted_stages_disabled(tmp_path):
    spec = load_spec(write(tmp_path, base_doc()))
    assert spec.stages.enabled() == ["pretrain", "test"]
    assert spec.test_systems == ["ch4"]
    assert spec.debug.workdir == "lamflow-runs" and spec.debug.pool_workers == 1
    assert spec.engine.service_account == "argo"
    assert check_spec(spec) == []
    assert resolved_type_map(spec) == ["H", "C"]


def test_spec_unknown_key_names_file_and_key(tmp_path):
    doc = base_doc()
    doc["stages"]["pretrain"]["epochs"] = 3
    doc["datasets"]["ch4"]["vaild"] = "x"
    p = write(tmp_path, doc)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p}: stages.pretrain.epochs: unknown key" in e.value.problems
    assert f"{p}: datasets.ch4.vaild: unknown key" in e.value.problems


def test_spec_reports_every_reference_problem_with_its_yaml_path(tmp_path):
    doc = base_doc(pretrain={"datasets": ["ch4"]}, finetune={"systems": ["ch4", "water", "si"]},
                   test={"systems": ["ch4", "nope"]}, distill={"teacher": "h2o"})
    p = write(tmp_path, doc)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    lines = e.value.problems
    assert f"{p}: stages.finetune.systems[1]: unknown dataset 'water' (datasets: ch4)" in lines
    assert f"{p}: stages.finetune.systems[2]: unknown dataset 'si' (datasets: ch4)" in lines
    assert f"{p}: stages.test.systems[1]: unknown dataset 'nope' (datasets: ch4)" in lines
    assert f"{p}: stages.distill.teacher: 'h2o' is not one of stages.finetune.systems" in lines
    assert any(ln.startswith(f"{p}: stages.test.systems: with finetune enabled") for ln in lines)
    assert all("\n" not in ln for ln in lines)


def test_check_spec_finds_missing_paths_before_reading_anything(tmp_path):
    doc = base_doc()
    doc["datasets"]["ch4"]["valid"] = [str(data_path("ch4_pbe", "valid")), "no/such/dir"]
    p = write(tmp_path, doc)
    lines = problems_of(p)
    assert lines == [f"{p}: datasets.ch4.valid[1]: no such file or directory: {(tmp_path / 'no/such/dir').resolve()}"]


def test_check_spec_rejects_elements_outside_the_type_map(tmp_path):
    doc = base_doc()
    doc["type_map"] = ["H", "O"]
    lines = problems_of(write(tmp_path, doc))
    assert lines and all("element(s) C not in the model type map" in ln for ln in lines)
    assert lines[0].split(": ")[1] == "datasets.ch4.train"


def test_check_spec_finds_nan_labels_naming_the_frame(tmp_path):
    bad = tmp_path / "ch4_valid"
    shutil.copytree(data_path("ch4_pbe", "valid"), bad)
    f = bad / "set.000" / "force.npy"
    force = np.load(f)
    force.reshape(force.shape[0], -1)[7, 4] = np.nan
    np.save(f, force)
    doc = base_doc()
    doc["datasets"]["ch4"]["valid"] = str(bad)
    lines = problems_of(write(tmp_path, doc))
    assert len(lines) == 1
    assert "datasets.ch4.valid" in lines[0] and "frame 7: force contains NaN" in lines[0]


def test_model_settings_errors_carry_the_stage_path(tmp_path):
    doc = base_doc()
    doc["stages"]["pretrain"]["training"]["numb_steps"] = -1
    doc["stages"]["pretrain"]["model"]["descriptor"]["rcut_smth"] = 9.0
    p = write(tmp_path, doc)
    lines = problems_of(p)
    assert any(ln.startswith(f"{p}: stages.pretrain.training.numb_steps: ") for ln in lines), lines
    assert any(ln.startswith(f"{p}: stages.pretrain.model.descriptor") and "rcut_smth" in ln for ln in lines), lines


def test_config_file_settings_merge_under_inline_ones(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.yaml").write_text(yaml.safe_dump({
        **TINY_MODEL, "learning_rate": {"start_lr": 0.01, "decay_steps": 7},
        "training": {"numb_steps": 50, "seed": 3, "training_data": {"systems": "ignored/path", "batch_size": 2}}}))
    doc = base_doc()
    doc["stages"]["pretrain"] = {"datasets": ["ch4"], "config": "models/tiny.yaml", "training": {"numb_steps": 6}}
    spec = load_spec(write(tmp_path, doc))
    pre = spec.stages.pretrain
    assert pre.training["numb_steps"] == 6 and pre.training["seed"] == 3  # inline wins, the rest merges
    assert pre.training["training_data"] == {"batch_size": 2}  # a standalone config's data paths are dropped
    assert pre.learning_rate == {"start_lr": 0.01, "decay_steps": 7}
    assert pre.model["descriptor"]["neuron"] == [4, 8]
    assert check_spec(spec) == []


def test_missing_config_file_is_one_line(tmp_path):
    doc = base_doc()
    doc["stages"]["pretrain"]["config"] = "models/none.yaml"
    p = write(tmp_path, doc)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(f"{p}: stages.pretrain.config: ") and "no such file" in e.value.problems[0]


def test_relative_paths_resolve_against_the_pipeline_folder(tmp_path):
    sub = tmp_path / "pipelines"
    sub.mkdir()
    shutil.copytree(data_path("ch4_pbe"), tmp_path / "data" / "ch4")
    doc = base_doc()
    doc["datasets"]["ch4"] = {"train": "../data/ch4/train", "valid": "../data/ch4/valid"}
    spec = load_spec(write(sub, doc))
    assert spec.datasets["ch4"].train == str((tmp_path / "data" / "ch4" / "train").resolve())
    assert check_spec(spec) == []


def test_cpu_stage_may_not_carry_gpu_scheduling(tmp_path):
    doc = base_doc()
    doc["stages"]["test"] = {"resources": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                            "effect": "NoSchedule"}],
                                           "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}}}
    p = write(tmp_path, doc)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert any(ln.startswith(f"{p}: stages.test.resources.tolerations[0]: ") for ln in e.value.problems)
    assert any(ln.startswith(f"{p}: stages.test.resources.node_selector: ") for ln in e.value.problems)


def test_stage_resources_merge_over_top_level_defaults(tmp_path):
    doc = base_doc()
    doc["resources"] = {"image": "reg/lamflow:0.1.0-cpu", "cpu": 2, "memory": "4Gi", "gpus": 1}
    doc["stages"]["test"] = {"resources": {"gpus": 0, "memory": "8Gi"}}
    spec = load_spec(write(tmp_path, doc))
    r = spec.resources_of("test")
    assert (r.image, r.cpu, r.memory, r.gpus) == ("reg/lamflow:0.1.0-cpu", 2, "8Gi", 0)
    assert spec.resources_of("pretrain").gpus == 1


def test_argo_needs_pinned_images(tmp_path):
    doc = base_doc()
    doc["resources"] = {"image": "reg/lamflow:latest"}
    doc["stages"]["test"] = {"resources": {"image": "reg/lamflow"}}
    p = write(tmp_path, doc)
    lines = image_problems(load_spec(p))
    assert f"{p}: stages.pretrain.resources.image: 'reg/lamflow:latest' is not pinned (use a version tag or @sha256:...)" in lines
    assert any(ln.startswith(f"{p}: stages.test.resources.image: 'reg/lamflow'") for ln in lines)


def test_validate_cli_prints_every_problem_and_exits_1(tmp_path, capsys):
    doc = base_doc(pretrain={"datasets": ["ch4"], **copy.deepcopy(TINY_MODEL)},
                   finetune={"systems": ["ch4", "x"], "pretrained": "p.ckpt"})
    doc["name"] = "Bad_Name"
    p = write(tmp_path, doc)
    assert main(["validate", str(p)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"{p}: name: 'Bad_Name': lower-case letters, digits and '-', at most 42 characters (it names the Argo workflow)" in err
    assert f"{p}: stages.finetune.systems[1]: unknown dataset 'x' (datasets: ch4)" in err
    assert err[-1] == f"{p}: 2 problem(s)"


def test_validate_cli_ok_prints_stages_and_type_map(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, base_doc()))]) == 0
    out = capsys.readouterr().out
    assert "stages pretrain, test" in out and "['H', 'C']" in out


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    p = write(tmp_path, textwrap.dedent("""\
        name: t
        datasets:
          ch4: {train: a, valid: b
        """))
    assert main(["validate", str(p)]) == 1
    err = capsys.readouterr().err
    assert f"{p}: malformed YAML (line" in err

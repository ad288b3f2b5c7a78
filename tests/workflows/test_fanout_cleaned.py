"""Each fan-out pod gets only its own system's cleaned data: the clean stage writes a per-system
`systems` output (<fanout>/<i>/<dataset>), and fine-tune / test step i reads only its sub-path,
on Argo (rendered) and in a debug run (the step's input folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, data_path

from lamflow.ops.common import pick_root
from lamflow.workflows.cli import main
from lamflow.workflows.render import render_manifest
from lamflow.workflows.spec import load_spec

CH4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}


def tiny_pretrained(tmp_path: Path) -> Path:
    import torch

    from lamflow.model.io.payload import save_model
    from lamflow.model.nn.config import ModelConfig
    from lamflow.model.nn.potential import EnergyModel

    torch.manual_seed(0)
    model = {**TINY["model"], "descriptor": {**TINY["model"]["descriptor"], "sel": [8, 4]}}
    return save_model(EnergyModel(ModelConfig.model_validate({"type_map": ["H", "C"], **model})), tmp_path / "pre.ckpt")


def pipeline(tmp_path: Path, **extra) -> Path:
    training = {k: v for k, v in TINY["training"].items() if k != "numb_steps"}
    doc = {"name": "fanout", "type_map": ["H", "C"], "datasets": {"ch4a": CH4, "ch4b": CH4},
           "stages": {"clean": {}, "finetune": {"systems": ["ch4a", "ch4b"], "pretrained": str(tiny_pretrained(tmp_path)),
                                                "training": {**training, "numb_steps": 2}},
                      "test": {"stability": None, "efficiency": None}},
           **extra}
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_rendered_fanout_steps_read_only_their_systems_cleaned_data(tmp_path):
    spec = load_spec(pipeline(tmp_path, engine={"namespace": "lamflow"}))
    m = render_manifest(spec)
    tasks = {t["name"]: t for tpl in m["spec"]["templates"] if "dag" in tpl for t in tpl["dag"]["tasks"]}
    clean_tpl = next(t for t in m["spec"]["templates"] if t["name"] == tasks["clean"]["template"])
    systems = next(a for a in clean_tpl["outputs"]["artifacts"] if a["name"] == "systems")
    assert systems["archive"] == {"none": {}}  # a sub-path of a tarball cannot be fetched alone
    clean_params = {p["name"]: p["value"] for p in tasks["clean"]["arguments"]["parameters"]}
    assert json.loads(clean_params["fanout"]) == {"finetune": ["ch4a", "ch4b"]}
    for name in ("finetune", "test"):
        arts = {a["name"]: a for a in tasks[name]["arguments"]["artifacts"]}
        assert arts["cleaned"]["from"] == "{{tasks.clean.outputs.artifacts.systems}}", name
        assert arts["cleaned"]["subPath"] == "cleaned-systems/finetune/{{item}}", name  # item i: systems[i] only
        assert arts["data"]["s3"]["key"].endswith("/systems/finetune/{{item}}"), name
    # whole-artifact consumers still read every cleaned dataset
    assert {a["name"]: a.get("from") for a in tasks["report"]["arguments"]["artifacts"]}.get("clean") is not None


@pytest.mark.slow
def test_debug_finetune_steps_receive_only_their_systems_cleaned_data(tmp_path, capsys):
    pipe = pipeline(tmp_path, debug={"workdir": str(tmp_path / "runs"), "pool_workers": 1})
    assert main(["submit", str(pipe), "--debug"]) == 0, capsys.readouterr().err
    run = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("fanout"))
    clean = next(run.glob("clean-h*"))
    whole = (clean / "outputs" / "artifacts" / "cleaned" / "cleaned").resolve()
    assert sorted(p.name for p in whole.iterdir()) == ["ch4a", "ch4b"]  # what pretrain / distill / report read
    for i, name in enumerate(["ch4a", "ch4b"]):
        for stage in ("finetune", "test"):
            step = next(run.glob(f"{stage}-{i}-h*"))
            got = (step / "inputs" / "artifacts" / "cleaned").resolve()
            assert sorted(p.name for p in got.iterdir()) == [name, "system.json"], (stage, i)
            assert json.loads((got / "system.json").read_text()) == {"dataset": name, "cleaned": True}
            assert pick_root(name, step / "inputs" / "artifacts" / "data", got) == got  # the OP reads this copy


def test_a_fanout_system_that_was_not_cleaned_falls_back_to_its_raw_data(tmp_path):
    from lamflow.ops.clean import write_fanout_systems
    from lamflow.ops.common import stage_dataset

    cleaned, raw = tmp_path / "cleaned", tmp_path / "raw"
    stage_dataset(cleaned, "ch4a", {"train": [CH4["train"]]}, link=False)
    stage_dataset(raw, "ch4b", {"train": [CH4["train"]]})
    out = write_fanout_systems(cleaned, tmp_path / "systems", {"test": ["ch4a", "ch4b"]})
    assert json.loads((out / "fanout.json").read_text()) == {"test": ["ch4a", "ch4b"]}
    assert sorted(p.name for p in (out / "test" / "0").iterdir()) == ["ch4a", "system.json"]
    assert (out / "test" / "0" / "ch4a" / "train" / "0" / "type.raw").is_file()
    assert sorted(p.name for p in (out / "test" / "1").iterdir()) == ["system.json"]  # the item exists, holding no data
    assert json.loads((out / "test" / "1" / "system.json").read_text()) == {"dataset": "ch4b", "cleaned": False}
    assert pick_root("ch4b", raw, out / "test" / "1") == raw

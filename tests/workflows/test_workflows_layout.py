"""The shape a newcomer relies on: pipeline commands and model tools in their own packages, one
`Backend` per engine behind `find_run`, and one way to go from a model artifact to its checkpoint."""

from __future__ import annotations

import pytest

from lamflow.ops.artifacts import has_model, model_file
from lamflow.workflows.cli import build_parser, command_modules

PIPELINE = {"submit", "render", "validate", "status", "watch", "logs", "list", "download", "retry"}
TOOLS = {"train", "test", "md", "inspect", "compress", "clean", "distill", "export_deepmd", "import_deepmd", "show",
         "change_bias"}


def test_cli_commands_are_pipeline_commands_or_model_tools_listed_alphabetically():
    mods = command_modules()
    groups = {m.rsplit(".", 2)[-2] for m in mods}
    assert groups == {"pipeline", "tools"}
    assert {m.rsplit(".", 1)[1] for m in mods if ".pipeline." in m} == PIPELINE
    assert {m.rsplit(".", 1)[1] for m in mods if ".tools." in m} == TOOLS
    names = list(build_parser()._subparsers._group_actions[0].choices)
    assert names == sorted(n.replace("_", "-") for n in PIPELINE | TOOLS)  # the order `lamflow --help` always had


def test_model_file_takes_a_model_folder_or_the_checkpoint_itself(tmp_path):
    out = tmp_path / "finetune-ch4"
    out.mkdir()
    assert model_file(out) == out / "model.ckpt" and not has_model(out)
    (out / "model.ckpt").write_bytes(b"x")
    assert has_model(out) and model_file(out / "model.ckpt") == out / "model.ckpt"
    assert model_file(str(tmp_path / "student.ckpt")) == tmp_path / "student.ckpt"


def test_find_run_asks_each_backend_and_names_both_places(tmp_path, monkeypatch):
    from lamflow.workflows.backends import ARGO, BACKENDS, DEBUG, Backend, find_run
    from lamflow.workflows.dflow_config import EngineError

    assert BACKENDS == (DEBUG, ARGO) and all(isinstance(b, Backend) for b in BACKENDS)
    assert (DEBUG.name, ARGO.name) == ("debug", "argo")
    monkeypatch.delenv("LAMFLOW_ARGO_HOST", raising=False)
    assert ARGO.find("quick-x1y2z", tmp_path) is None and ARGO.runs(tmp_path) == []
    with pytest.raises(EngineError, match=r"no run 'quick-x1y2z' in .* \(debug runs\), and LAMFLOW_ARGO_HOST is not set"):
        find_run("quick-x1y2z", tmp_path)


def test_the_stage_table_is_what_the_dag_spec_and_download_use():
    from lamflow import ops
    from lamflow.workflows import dag, results, spec, stages

    assert stages.ORDER == (*spec.STAGES, "report") and dag.ORDER is stages.ORDER  # one list of stages, in pipeline order
    assert stages.SLICED == ("finetune", "test") and dag.SLICED is stages.SLICED
    assert spec.PARALLEL_STAGES is stages.PARALLEL_STAGES == ("pretrain", "finetune", "distill")
    assert all(s.op in ops._MODULES for s in stages.TABLE)  # every stage's OP exists in lamflow.ops
    assert results.OUTPUT_OF == {s.name: s.outputs[0] for s in stages.TABLE}
    assert stages.later_stages("distill") == {"distill", "compress", "report"}


def test_model_and_pipeline_configs_share_one_error_formatter():
    from pydantic import ValidationError

    from lamflow.model.nn.config import DESCRIPTOR_TAGS
    from lamflow.model.schema import format_validation_error
    from lamflow.model.training.config import TrainSettings
    from lamflow.workflows.spec import format_errors

    bad = {"model": {"type_map": ["H"], "descriptor": {"type": "se_e2_a", "sel": [4], "neuron": [4, -1]}},
           "training": {"training_data": {"batch_size": 0}, "validation_data": {"numb_btch": 0}}}
    with pytest.raises(ValidationError) as e:
        TrainSettings.model_validate(bad)  # a stage's settings, checked without any data attached
    model = format_validation_error("t.yaml", e.value, DESCRIPTOR_TAGS).splitlines()
    spec = format_errors("p.yaml", e.value, "stages.pretrain")
    keys = [ln.split(": ")[1] for ln in model]
    assert keys == ["model.descriptor", "training.training_data.batch_size", "training.validation_data.numb_btch"]
    assert [ln.split(": ")[1] for ln in spec] == [f"stages.pretrain.{k}" for k in keys]  # same keys, the stage's prefix
    assert spec[1].endswith("batch_size 0: give 1..1000000 frames, 'auto' or 'auto:N'")  # no "Value error, " in a spec

"""Rendered Argo manifests: valid against the Argo Workflows v4 CRD schema (with unknown keys
rejected), GPU fields on GPU stages only, no secret from the environment, pinned images."""

from __future__ import annotations

import copy
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import data_path

from lamflow.workflows.cli import main
from lamflow.workflows.render import render_manifest
from lamflow.workflows.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


def _schemas() -> Path:
    """../shared/schemas beside the checkout (or beside a folder of worktrees); LAMFLOW_SCHEMAS overrides."""
    if os.environ.get("LAMFLOW_SCHEMAS"):
        return Path(os.environ["LAMFLOW_SCHEMAS"])
    for up in REPO.parents:
        if (up / "shared" / "schemas").is_dir():
            return up / "shared" / "schemas"
    return REPO.parent / "shared" / "schemas"


SCHEMAS = _schemas()
CRD = SCHEMAS / "argo" / "argoproj.io_workflows.crd.yaml"
GPU_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
IMAGE_CPU = "registry.example.com/ml/lamflow:0.1.0-3f2c1ab9e0d4-cpu"
IMAGE_GPU = "registry.example.com/ml/lamflow@sha256:" + "ab" * 32

TINY = {"model": {"descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [8, 4], "neuron": [4, 8],
                                 "axis_neuron": 2}, "fitting_net": {"neuron": [8, 8]}},
        "training": {"numb_steps": 4}}


# ----------------------------------------------------------------------------- the schema


def strict(schema):
    """The CRD's schema with `additionalProperties: false` wherever properties are listed, so a
    misspelled key fails too (the CRD itself allows unknown keys)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@lru_cache(maxsize=1)
def workflow_schema() -> dict:
    assert CRD.is_file(), f"Argo CRD schema not found at {CRD}"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD.read_text(), Loader=loader)
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return strict(ver["schema"]["openAPIV3Schema"])


def schema_errors(manifest: dict) -> list[str]:
    v = jsonschema.Draft7Validator(workflow_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(manifest)]


# ----------------------------------------------------------------------------- helpers


def script_templates(m: dict) -> dict[str, dict]:
    """template name -> template, for the templates that run a step (script or container)."""
    return {t["name"]: t for t in m["spec"]["templates"] if "script" in t or "container" in t}


def stage_templates(m: dict) -> dict[str, dict]:
    """dag task name (stage) -> its template."""
    by_name = {t["name"]: t for t in m["spec"]["templates"]}
    dag = next(t for t in m["spec"]["templates"] if t["name"] == m["spec"]["entrypoint"])
    out = {}
    for task in dag["dag"]["tasks"]:
        t = by_name[task["template"]]
        if "script" in t and not task["name"].endswith("init-artifact"):
            out[task["name"]] = t
    return out


def gpu_doc(tmp_path: Path) -> Path:
    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    gpu = {"image": IMAGE_GPU, "cpu": 8, "memory": "32Gi", "gpus": 1, "node_selector": GPU_SELECTOR,
           "tolerations": [GPU_TOLERATION], "timeout": 86400, "retries": 2}
    doc = {"name": "gpu-demo", "datasets": {"ch4": ch4, "ch4b": ch4},
           "resources": {"image": IMAGE_CPU, "cpu": 2, "memory": "4Gi"},
           "stages": {"clean": {}, "pretrain": {"datasets": ["ch4"], **TINY, "resources": gpu},
                      "test": {"systems": ["ch4", "ch4b"]}},
           "engine": {"namespace": "lamflow", "artifact_repo_key": "lamflow-s3", "util_image": IMAGE_CPU}}
    p = tmp_path / "gpu.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.fixture()
def manifest(tmp_path) -> dict:
    return render_manifest(load_spec(gpu_doc(tmp_path)))


# ----------------------------------------------------------------------------- tests


def test_rendered_manifest_validates_against_the_argo_v4_crd(manifest):
    assert manifest["apiVersion"] == "argoproj.io/v1alpha1" and manifest["kind"] == "Workflow"
    assert manifest["metadata"]["namespace"] == "lamflow"
    assert manifest["spec"]["serviceAccountName"] == "argo"
    assert manifest["spec"]["artifactRepositoryRef"] == {"key": "lamflow-s3"}
    assert schema_errors(manifest) == []


def test_schema_check_catches_a_misspelled_key_and_a_wrong_type(manifest):
    bad = copy.deepcopy(manifest)
    t = next(iter(script_templates(bad).values()))
    t["scriptt"] = t.pop("script")
    bad["spec"]["templates"][0]["retryStrategy"] = {"limit": {"x": 1}}
    errs = schema_errors(bad)
    assert any("scriptt" in e for e in errs), errs
    assert any("retryStrategy" in e for e in errs), errs


def test_gpu_fields_appear_on_gpu_stages_only(manifest):
    stages = stage_templates(manifest)
    assert set(stages) >= {"clean", "pretrain", "test", "report"}
    pre = stages["pretrain"]
    assert pre["script"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pre["script"]["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert pre["nodeSelector"] == GPU_SELECTOR
    assert pre["tolerations"] == [GPU_TOLERATION]
    assert pre["timeout"] == "86400s"
    # a training step retries preemption/eviction (pod Error) and transient failures (exit 1), not fatal ones (2)
    rs = pre["retryStrategy"]
    assert rs["limit"] == 3 and rs["retryPolicy"] == "Always"  # max(retries 2, engine.preemption_retries 3)
    assert rs["expression"] == 'lastRetry.status == "Error" || (lastRetry.status == "Failed" && asInt(lastRetry.exitCode) == 1)'
    assert "retryStrategy" not in stages["clean"]  # other stages: only their own `retries` (none here)
    assert pre["script"]["image"] == IMAGE_GPU
    for name, t in stages.items():
        if name == "pretrain":
            continue
        text = json.dumps(t)
        assert "nvidia.com" not in text, name
        assert not t.get("nodeSelector") and not t.get("tolerations"), name
        assert t["script"]["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    # helper pods (slices' init-artifact) get no GPU either
    for t in manifest["spec"]["templates"]:
        if t["name"].endswith("init-artifact"):
            assert "nvidia.com" not in json.dumps(t)


def render_with_real_keys(spec_path, secrets: dict, monkeypatch) -> tuple[dict, str]:
    """Render as `lamflow submit` does once configure_argo has put the real keys (from the
    environment) into dflow: (the manifest, the S3 secret key dflow held while rendering)."""
    from dflow import config, s3_config

    from lamflow.workflows.dflow_config import ArgoEnv, configure_argo

    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LAMFLOW_ARGO_HOST", "https://127.0.0.1:9")
    monkeypatch.setenv("LAMFLOW_S3_ENDPOINT", "127.0.0.1:9")
    monkeypatch.setenv("LAMFLOW_S3_BUCKET", "lamflow-artifacts")
    spec = load_spec(spec_path)
    saved = dict(config), dict(s3_config)
    try:
        configure_argo(ArgoEnv.from_env(spec), spec)
        return render_manifest(spec), s3_config["secret_key"]
    finally:
        config.update(saved[0])
        s3_config.update(saved[1])


def test_no_secret_from_the_environment_reaches_the_manifest(tmp_path, monkeypatch):
    secrets = {"LAMFLOW_ARGO_TOKEN": "tok-3f9a7c1e5b", "LAMFLOW_S3_ACCESS_KEY": "AKIA7QZ3EXAMPLE",
               "LAMFLOW_S3_SECRET_KEY": "s3cr3t-9d8e7f6a5b4c"}
    m, held = render_with_real_keys(gpu_doc(tmp_path), secrets, monkeypatch)
    assert held == secrets["LAMFLOW_S3_SECRET_KEY"]  # dflow held the real keys while rendering
    text = json.dumps(m)
    for k, v in secrets.items():
        assert v not in text, f"{k} leaked into the manifest"
    assert '\\"secret_key\\": \\"\\"' in text  # dflow's embedded s3 config has a blank key


def test_every_image_is_pinned(manifest):
    images = [t["script"]["image"] for t in manifest["spec"]["templates"] if "script" in t]
    images += [t["container"]["image"] for t in manifest["spec"]["templates"] if "container" in t]
    assert images
    for img in images:
        assert re.search(r"@sha256:[0-9a-f]{64}$", img) or (":" in img.rsplit("/", 1)[-1] and not img.endswith(":latest")), img
    assert "python:3.8" not in images  # dflow's default util image is replaced by the pinned one


def test_render_is_deterministic_and_offline(tmp_path):
    spec = load_spec(gpu_doc(tmp_path))
    a, b = render_manifest(spec), render_manifest(spec)
    assert a == b
    keys = {task["name"]: {x["s3"]["key"] for x in task.get("arguments", {}).get("artifacts", []) if "s3" in x}
            for t in a["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"]}
    (data,) = keys["clean"]
    assert data.startswith("lamflow/inputs/gpu-demo-") and data.endswith("/data.tgz")
    # each test pod fetches only its own system: the item-th per-system object, not data.tgz
    assert keys["test"] == {data.rsplit("/", 1)[0] + "/systems/test/{{item}}"}


def test_render_cli_writes_the_manifest(tmp_path, capsys):
    out = tmp_path / "wf.yaml"
    assert main(["render", str(gpu_doc(tmp_path)), "-o", str(out), "--namespace", "team-a"]) == 0
    m = yaml.safe_load(out.read_text())
    assert m["metadata"]["namespace"] == "team-a"
    assert m["metadata"]["generateName"] == "gpu-demo-"
    assert schema_errors(m) == []


def test_render_refuses_unpinned_images(tmp_path, capsys):
    doc = yaml.safe_load(gpu_doc(tmp_path).read_text())
    doc["resources"]["image"] = "lamflow:latest"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main(["render", str(p)]) == 1
    assert "stages.clean.resources.image: 'lamflow:latest' is not pinned" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["quickstart", "dpa2-production"])
def test_templates_render_to_valid_manifests_with_gpu_fields_only_on_gpu_stages(name):
    spec = load_spec(REPO / "templates" / f"{name}.yaml")
    m = render_manifest(spec)
    assert schema_errors(m) == []
    stages = stage_templates(m)
    multinode = spec.stages.pretrain.enabled and spec.resources_of("pretrain").nodes > 1
    # a multi-node pretrain is a TrainJob (tests/workflows/test_trainjob.py) between two CPU helper pods
    helpers = {"pretrain-inputs", "pretrain"} if multinode else set()
    assert set(stages) == set(spec.stages.enabled()) | {"report"} | helpers
    for stage, t in stages.items():
        res = spec.resources if stage in ("report", *helpers) else spec.resources_of(stage)
        limits = t["script"].get("resources", {}).get("limits", {})
        if res.gpus:
            assert limits["nvidia.com/gpu"] == str(res.gpus), stage
            assert t["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, stage
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in t["tolerations"], stage
        else:
            assert "nvidia.com" not in json.dumps(t), stage
    images = [t["script"]["image"] for t in m["spec"]["templates"] if "script" in t]
    assert all(":" in i.rsplit("/", 1)[-1] and not i.endswith(":latest") for i in images), images
    if name == "dpa2-production":
        assert {s for s, t in stages.items() if "nvidia.com/gpu" in json.dumps(t)} == {"finetune", "distill"}


def test_production_template_passes_validate_for_argo(capsys):
    assert main(["validate", str(REPO / "templates" / "dpa2-production.yaml"), "--argo"]) == 0
    out = capsys.readouterr().out
    assert "datasets on S3" in out and "stages clean, pretrain, finetune, test, distill, compress" in out


def test_finetune_from_a_given_checkpoint_gets_it_as_an_input_artifact(tmp_path):
    import torch

    from lamflow.model.io.payload import save_model
    from lamflow.model.nn.config import ModelConfig
    from lamflow.model.nn.potential import EnergyModel

    torch.manual_seed(0)
    ckpt = save_model(EnergyModel(ModelConfig.model_validate({"type_map": ["H", "C"], **TINY["model"]})), tmp_path / "pre.ckpt")
    doc = yaml.safe_load(gpu_doc(tmp_path).read_text())
    doc["stages"] = {"finetune": {"systems": ["ch4"], "pretrained": str(ckpt), "training": {"numb_steps": 4}}, "test": {}}
    p = tmp_path / "ft.yaml"
    p.write_text(yaml.safe_dump(doc))
    spec = load_spec(p)
    assert spec.stages.enabled() == ["finetune", "test"]
    m = render_manifest(spec)
    assert schema_errors(m) == []
    keys = {a["name"]: a["s3"]["key"] for t in m["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"]
            for a in task.get("arguments", {}).get("artifacts", []) if "s3" in a}
    assert keys["pretrained"].endswith("/pretrained.tgz") and keys["data"].endswith("/systems/finetune/{{item}}")
    ft = next(task for t in m["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"] if task["name"] == "finetune")
    config = json.loads(next(a["value"] for a in ft["arguments"]["parameters"] if a["name"] == "config"))
    assert config["model"]["descriptor"]["type"] == "se_e2_a"  # taken from the checkpoint

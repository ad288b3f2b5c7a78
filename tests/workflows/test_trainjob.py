"""`resources.nodes: M` on pretrain: the stage as a Kubeflow Trainer v2 TrainJob, created and
waited on by an Argo resource template.
  * rendered offline: the TrainJob validates against the Trainer v2.3.0 CRD schema with unknown
    keys rejected, the Workflow against the Argo v4.1.2 CRD; GPUs, node selector, tolerations
    per node; credentials only as Secret references; the wait conditions are keys Argo's
    label-selector parser accepts and mean what they should on sample TrainJob statuses;
  * the node command run for real on one loopback "node" (torchrun with the runtime's PET_*
    variables, moto as S3): inputs published by the inputs step, trained, resumed state synced,
    and the model handed to the collect step through the store.
Not run: a TrainJob on a cluster (no Kubernetes API server here)."""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache

import jsonschema
import pytest
import yaml
from conftest import TINY, data_path
from test_render import IMAGE_CPU, IMAGE_GPU, SCHEMAS, schema_errors, strict

from lamflow.workflows.render import render_manifest
from lamflow.workflows.spec import SpecError, load_spec

TRAINJOB_CRD = SCHEMAS / "kubeflow-trainer" / "trainer.kubeflow.org_trainjobs.yaml"
GPU_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
LABEL_KEY = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")  # k8s qualified name (label-selector keys)


@lru_cache(maxsize=1)
def trainjob_schema() -> dict:
    crd = yaml.load(TRAINJOB_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return strict(ver["schema"]["openAPIV3Schema"])


def trainjob_errors(obj: dict) -> list[str]:
    v = jsonschema.Draft7Validator(trainjob_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


def doc(nodes=2, gpus=8, **stages) -> dict:
    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    gpu = {"image": IMAGE_GPU, "cpu": 32, "memory": "512Gi", "gpus": gpus, "nodes": nodes, "node_selector": GPU_SELECTOR,
           "tolerations": [TOLERATION], "timeout": 86400}
    return {"name": "multinode-demo", "datasets": {"ch4": ch4}, "resources": {"image": IMAGE_CPU, "cpu": 2, "memory": "4Gi"},
            "stages": {"clean": {}, "pretrain": {"datasets": ["ch4"], **TINY, "resources": gpu}, "test": {}, **stages},
            "engine": {"artifact_repo_key": "lamflow-s3", "util_image": IMAGE_CPU}}


def write(tmp_path, d) -> object:
    p = tmp_path / "mn.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def trainjob_of(m: dict) -> tuple[dict, dict]:
    (t,) = [t for t in m["spec"]["templates"] if "resource" in t]
    return t, yaml.safe_load(t["resource"]["manifest"])


def tasks_of(m: dict) -> dict:
    dag = next(t for t in m["spec"]["templates"] if t["name"] == m["spec"]["entrypoint"])
    return {task["name"]: task for task in dag["dag"]["tasks"]}


def lookup(obj, path: str):
    """A dotted gjson-style path with numeric list indices (what Argo reads)."""
    for part in path.split("."):
        if isinstance(obj, list):
            obj = obj[int(part)] if part.isdigit() and int(part) < len(obj) else None
        elif isinstance(obj, dict):
            obj = obj.get(part)
        if obj is None:
            return None
    return obj


def holds(cond: str, obj: dict) -> bool:
    key, op, value = cond.split()
    assert LABEL_KEY.match(key) and len(key.rsplit("/", 1)[-1]) <= 63, key
    got = lookup(obj, key)
    return got is not None and {">": got > int(value), "<": got < int(value)}[op]


def test_multinode_pretrain_renders_a_trainjob_valid_against_the_trainer_crd(tmp_path):
    m = render_manifest(load_spec(write(tmp_path, doc())))
    assert schema_errors(m) == []
    t, job = trainjob_of(m)
    assert trainjob_errors(job) == []
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["generateName"] == "multinode-demo-pretrain-"
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    tr = spec["trainer"]
    assert tr["numNodes"] == 2 and tr["numProcPerNode"] == 8
    assert tr["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8", "memory": "512Gi"},
                                      "requests": {"cpu": "32", "memory": "512Gi"}}
    assert tr["image"] == IMAGE_GPU and tr["command"] == ["python3", "-m", "lamflow.ops.torchrun", "node"]
    env = {e["name"]: e for e in tr["env"]}
    assert env["LAMFLOW_CHECKPOINT_KEY"]["value"] == "lamflow/checkpoints/{{workflow.name}}/pretrain"
    for name, key in (("LAMFLOW_S3_ACCESS_KEY", "accesskey"), ("LAMFLOW_S3_SECRET_KEY", "secretkey")):
        assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": "lamflow-s3-credentials", "key": key}}}
    import base64

    jobspec = json.loads(base64.b64decode(env["LAMFLOW_JOB"]["value"]))
    assert jobspec["datasets"] == ["ch4"] and jobspec["cleaned"] is True and "key" not in jobspec["store"]
    (patch,) = spec["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"  # the torch-distributed runtime's replicated job
    assert pod["template"]["spec"]["template"]["spec"] == {"nodeSelector": GPU_SELECTOR, "tolerations": [TOLERATION]}
    assert spec["activeDeadlineSeconds"] == 86400

    res = t["resource"]
    assert res["action"] == "create" and res["setOwnerReference"] is True
    assert t["retryStrategy"]["limit"] == 3 and t["retryStrategy"]["retryPolicy"] == "Always"
    # the wait conditions, on what a TrainJob's status looks like while running / after / on failure
    running = {"status": {"jobsStatus": [{"name": "node", "active": 1, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]}}
    done = copy.deepcopy(running)
    done["status"]["jobsStatus"][0].update(active=0, succeeded=1)
    failed = copy.deepcopy(running)
    failed["status"]["jobsStatus"][0].update(active=0, failed=1)
    assert [holds(res["successCondition"], s) for s in (running, done, failed, {"status": {}})] == [False, True, False, False]
    assert [holds(res["failureCondition"], s) for s in (running, done, failed, {"status": {}})] == [False, False, True, False]

    tasks = tasks_of(m)
    assert "(pretrain-inputs.Succeeded)" in tasks["pretrain-trainjob"]["depends"]
    assert "(pretrain-trainjob.Succeeded)" in tasks["pretrain"]["depends"]
    assert "(pretrain.Succeeded)" in tasks["test"]["depends"]  # later stages read the collected model as before
    assert "nvidia.com/gpu" not in json.dumps([x for x in m["spec"]["templates"] if "resource" not in x])  # helpers on CPU


def test_the_helper_steps_of_a_multinode_stage_belong_to_it_for_status_and_retry():
    from lamflow.workflows.dag import stage_of

    assert [stage_of(k) for k in ("pretrain-inputs", "pretrain-trainjob", "pretrain", "finetune-12", "test-0")] == [
        "pretrain", "pretrain", "pretrain", "finetune", "test"]


def test_trainjob_schema_check_catches_a_misspelled_key_and_a_wrong_type(tmp_path):
    _, job = trainjob_of(render_manifest(load_spec(write(tmp_path, doc()))))
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    bad["spec"]["trainer"]["numProcPerNode"] = "eight"
    errs = trainjob_errors(bad)
    assert any("numNode" in e for e in errs) and any("eight" in e for e in errs), errs


def test_resources_that_cannot_work_are_refused_one_line_each(tmp_path):
    d = doc()
    d["stages"]["test"] = {"resources": {"gpus": 2, "nodes": 2}}
    d["stages"]["pretrain"]["resources"]["gpus"] = 0
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, d))
    lines = e.value.problems
    assert any("stages.test.resources.gpus: 2: stage test does not train data-parallel" in ln for ln in lines), lines
    assert any("stages.test.resources.nodes: 2: only pretrain runs on several nodes" in ln for ln in lines), lines
    assert any("stages.pretrain.resources.nodes: 2: a multi-node stage needs gpus" in ln for ln in lines), lines
    d = doc()
    d["engine"]["checkpoints"] = {"enabled": False}
    with pytest.raises(SpecError, match="hands its model over through the checkpoint store"):
        load_spec(write(tmp_path, d))


def test_gpus_per_pod_render_torchrun_processes_and_limits(tmp_path):
    d = doc(nodes=1, gpus=4)
    m = render_manifest(load_spec(write(tmp_path, d)))
    assert not [t for t in m["spec"]["templates"] if "resource" in t]
    pre = tasks_of(m)["pretrain"]
    params = {p["name"]: p.get("value") for p in pre["arguments"]["parameters"]}
    assert params["nproc"] == "4" and params["threads"] == "32"
    key = json.loads(params["checkpoint_store"])["key"]  # by the hashed step key: changed settings never resume old checkpoints
    assert re.fullmatch(r"lamflow/checkpoints/\{\{workflow.name\}\}/pretrain-h[0-9a-f]{8}", key), key
    tmpl = next(t for t in m["spec"]["templates"] if t["name"] == pre["template"])
    assert tmpl["script"]["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_a_trainjob_node_trains_from_published_inputs_and_hands_the_model_to_collect(tmp_path, monkeypatch):
    """ops/trainjob.py for real on one loopback node: what the inputs step, a node pod and the
    collect step do, with moto as the store and torchrun reading the runtime's PET_* variables."""
    import socket

    from minio import Minio
    from moto.server import ThreadedMotoServer

    from lamflow.model.io.checkpoint import load_model
    from lamflow.ops.checkpoint_store import CheckpointStore, StoreConfig
    from lamflow.ops.common import stage_dataset
    from lamflow.ops.trainjob import JOB_ENV, KEY_ENV, encode_job, run_node

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("LAMFLOW_S3_ACCESS_KEY", "k")
        monkeypatch.setenv("LAMFLOW_S3_SECRET_KEY", "s-123456")
        Minio(f"{host}:{port}", access_key="k", secret_key="s-123456", secure=False).make_bucket("lamflow-nodes")
        store = StoreConfig(f"{host}:{port}", "lamflow-nodes", "lamflow/checkpoints/wf-1/pretrain")
        data = tmp_path / "data"
        stage_dataset(data, "ch4", {"train": [str(data_path("ch4_pbe", "train"))],
                                    "valid": [str(data_path("ch4_pbe", "valid"))]})
        CheckpointStore(store).put_tree("inputs/data", data)  # the inputs step (PublishInputs)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        for k, v in {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
                     "PET_MASTER_PORT": str(free), "LAMFLOW_WORKDIR": str(tmp_path / "node0"), KEY_ENV: store.key,
                     JOB_ENV: encode_job({"config": TINY, "datasets": ["ch4"], "type_map": ["H", "C"], "cleaned": False,
                                          "threads": 1,
                                          "store": {"endpoint": store.endpoint, "bucket": "lamflow-nodes"}})}.items():
            monkeypatch.setenv(k, v)
        lines = []
        assert run_node(log=lines.append) == 0
        assert any("lamflow.ops.torchrun worker" in ln for ln in lines)
        assert CheckpointStore(store).latest()["step"] == TINY["training"]["numb_steps"]
        got = CheckpointStore(store).get_tree("results", tmp_path / "collected")  # the collect step
        assert load_model(got / "model.ckpt").type_map == ["H", "C"]
        assert json.loads((got / "summary.json").read_text())["steps"] == TINY["training"]["numb_steps"]
    finally:
        server.stop()


def test_production_template_pretrains_on_two_nodes_of_eight_gpus_and_fine_tunes_on_one_each(monkeypatch):
    from test_render import REPO, render_with_real_keys

    secrets = {"LAMFLOW_ARGO_TOKEN": "tok-prod-8e1f2a", "LAMFLOW_S3_ACCESS_KEY": "AKIAPRODEXAMPLE7",
               "LAMFLOW_S3_SECRET_KEY": "prod-s3cr3t-1a2b3c4d"}
    m, _ = render_with_real_keys(REPO / "templates" / "dpa2-production.yaml", secrets, monkeypatch)
    text = json.dumps(m)
    for k, v in secrets.items():
        assert v not in text, f"{k} leaked into the manifest"
    assert schema_errors(m) == []

    t, job = trainjob_of(m)
    assert trainjob_errors(job) == []
    tr = job["spec"]["trainer"]
    assert tr["numNodes"] == 2 and tr["numProcPerNode"] == 8
    assert tr["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"] == {
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, "tolerations": [TOLERATION]}
    assert all("value" not in e for e in tr["env"] if e["name"].startswith("LAMFLOW_S3_"))  # Secret references only
    assert t["retryStrategy"]["limit"] == 5  # engine.preemption_retries

    by_name = {x["name"]: x for x in m["spec"]["templates"]}
    tasks = tasks_of(m)
    ft = by_name[tasks["finetune"]["template"]]
    assert ft["script"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    params = {p["name"]: p.get("value") for p in tasks["finetune"]["arguments"]["parameters"]}
    assert params["nproc"] == "1"  # one GPU per system: no torchrun
    assert ft["retryStrategy"]["limit"] == 5 and ft["retryStrategy"]["retryPolicy"] == "Always"
    env = {e["name"]: e for e in ft["script"]["env"]}
    assert env["LAMFLOW_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "lamflow-s3-credentials", "key": "secretkey"}
    assert json.loads(params["checkpoint_store"])["endpoint"] == "minio.lamflow-minio.svc:9000"
    for name in ("test", "compress", "report", "clean", "pretrain-inputs", "pretrain"):
        assert "retryPolicy" not in json.dumps(by_name[tasks[name]["template"]].get("retryStrategy", {})), name

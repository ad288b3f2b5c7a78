"""The Argo submission path without a cluster: the inputs go to a real S3 protocol server on
loopback (moto), and argo-server is a small local HTTP server that records each request, so we
check what `lamflow submit` / `lamflow retry` would send to a real one."""

from __future__ import annotations

import copy
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import data_path

from lamflow.workflows.cli import main

BUCKET = "lamflow-artifacts"
SECRETS = {"LAMFLOW_ARGO_TOKEN": "tok-52c1d9e8a7", "LAMFLOW_S3_ACCESS_KEY": "lamflowkey",
           "LAMFLOW_S3_SECRET_KEY": "pw-0d9c8b7a6f5e"}
IMAGE = "registry.example.com/ml/lamflow:0.1.0-3f2c1ab9e0d4-cpu"
TINY = {"model": {"descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": [8, 4], "neuron": [4, 8],
                                 "axis_neuron": 2}, "fitting_net": {"neuron": [8, 8]}},
        "training": {"numb_steps": 4}}


class FakeArgo:
    """argo-server + the bits of the Kubernetes API dflow calls: records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.workflows: dict[str, dict] = {}
        self.configmaps: list[dict] = []
        self.pod_log = ["step log line 1", "step log line 2"]
        self.n = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                fake.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "v1", "workflows"]:
                    wf = copy.deepcopy(body["workflow"])
                    fake.n += 1
                    name = wf["metadata"].get("name") or f"{wf['metadata']['generateName']}x{fake.n:04d}"
                    wf["metadata"]["name"] = name
                    wf["metadata"]["uid"] = f"uid-{fake.n}"
                    wf["status"] = {"phase": "Pending"}
                    fake.workflows[name] = wf
                    return self._reply(wf)
                if parts[:3] == ["api", "v1", "namespaces"] and parts[-1] == "configmaps":
                    fake.configmaps.append(body)
                    return self._reply(body)
                self._reply({"message": "not found"}, 404)

            def do_GET(self):
                fake.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "v1", "workflows"] and len(parts) == 5 and parts[4] in fake.workflows:
                    return self._reply(fake.workflows[parts[4]])
                if parts[:3] == ["api", "v1", "workflows"] and len(parts) == 4:  # list
                    return self._reply({"items": [{"metadata": w["metadata"], "status": {"phase": w["status"].get("phase")}}
                                                  for w in fake.workflows.values()]})
                if parts[:3] == ["api", "v1", "workflows"] and len(parts) == 6 and parts[5] == "log":
                    body = "\n".join(json.dumps({"result": {"content": ln, "podName": "p"}}) for ln in fake.pod_log)
                    data = body.encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                self._reply({"message": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, prefix: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"].startswith(prefix)]


@pytest.fixture()
def s3():
    from minio import Minio
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = Minio(f"{host}:{port}", access_key=SECRETS["LAMFLOW_S3_ACCESS_KEY"],
                   secret_key=SECRETS["LAMFLOW_S3_SECRET_KEY"], secure=False)
    client.make_bucket(BUCKET)
    yield f"{host}:{port}", client
    server.stop()


@pytest.fixture()
def argo(monkeypatch, s3):
    from dflow import config, s3_config

    fake = FakeArgo()
    endpoint, _ = s3
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LAMFLOW_ARGO_HOST", fake.url)
    monkeypatch.setenv("LAMFLOW_NAMESPACE", "lamflow")
    monkeypatch.setenv("LAMFLOW_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("LAMFLOW_S3_BUCKET", BUCKET)
    monkeypatch.setenv("DFLOW_K8S_API_SERVER", fake.url)  # dflow creates memoization ConfigMaps there
    saved = dict(config), dict(s3_config)
    yield fake
    config.clear()
    config.update(saved[0])
    s3_config.clear()
    s3_config.update(saved[1])
    fake.server.shutdown()


def pipeline(tmp_path: Path) -> Path:
    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    doc = {"name": "argo-demo", "datasets": {"ch4": ch4, "ch4b": ch4}, "resources": {"image": IMAGE, "cpu": 1, "memory": "2Gi"},
           "stages": {"pretrain": {"datasets": ["ch4"], **TINY}, "test": {"systems": ["ch4", "ch4b"]}},
           "engine": {"artifact_repo_key": "lamflow-s3"}}
    p = tmp_path / "argo.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def submitted_id(out: str) -> str:
    return next(ln.split()[1] for ln in out.splitlines() if ln.startswith("submitted "))


def test_submit_uploads_inputs_to_s3_and_posts_the_rendered_manifest(tmp_path, argo, s3, capsys):
    from lamflow.workflows.render import render_manifest
    from lamflow.workflows.spec import load_spec

    _, client = s3
    pipe = pipeline(tmp_path)
    assert main(["submit", str(pipe)]) == 0
    wid = submitted_id(capsys.readouterr().out)
    posts = argo.posts("/api/v1/workflows/")
    assert len(posts) == 1
    req = posts[0]
    assert req["path"] == "/api/v1/workflows/lamflow"
    assert req["headers"]["Authorization"] == f"Bearer {SECRETS['LAMFLOW_ARGO_TOKEN']}"
    manifest = req["body"]["workflow"]
    assert manifest == render_manifest(load_spec(pipe))  # the POST body is exactly what `lamflow render` writes
    assert wid == argo.workflows[wid]["metadata"]["name"] and wid.startswith("argo-demo-")
    text = json.dumps(req["body"])
    for k, v in SECRETS.items():
        assert v not in text, f"{k} leaked into the submitted workflow"

    # the data artifact the manifest points to is in the bucket, with the staged layout inside
    keys = {a["s3"]["key"] for t in manifest["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"]
            for a in task.get("arguments", {}).get("artifacts", []) if "s3" in a}
    (key,) = {k for k in keys if k.endswith("/data.tgz")}
    assert keys - {key} == {key.replace("data.tgz", "systems/test/{{item}}")}  # the test fan-out's per-system data
    blob = client.get_object(BUCKET, key).read()
    names = tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz").getnames()
    assert any(n.endswith("ch4/dataset.json") for n in names)
    assert any(n.endswith("ch4/train/0/set.000/force.npy") for n in names)
    assert any("/.dflow/" in n for n in names)  # dflow's catalog, which the step reads back

    # a second submit of unchanged data does not upload again
    assert main(["submit", str(pipe)]) == 0
    assert "already uploaded" in capsys.readouterr().out


def test_submit_without_s3_settings_fails_in_one_line(tmp_path, argo, monkeypatch, capsys):
    monkeypatch.delenv("LAMFLOW_S3_SECRET_KEY")
    assert main(["submit", str(pipeline(tmp_path))]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "lamflow submit: error: S3 settings missing from the environment: LAMFLOW_S3_SECRET_KEY (see deploy/README.md)"
    assert not argo.posts("/api/v1/workflows/")


def node(wf: dict, template: str, key: str, phase: str, outputs: dict | None = None) -> dict:
    nid = f"{wf['metadata']['name']}-{abs(hash(key)) % 10**9}"
    return {"id": nid, "name": f"{wf['metadata']['name']}.{key}", "displayName": key, "type": "Pod", "templateName": template,
            "phase": phase, "startedAt": "2026-11-21T06:00:00Z", "finishedAt": "2026-11-21T06:01:00Z",
            "inputs": {"parameters": [{"name": "dflow_key", "value": key}]}, "outputs": outputs or {}}


def test_retry_on_argo_memoizes_succeeded_steps_and_reruns_the_failed_one(tmp_path, argo, s3, capsys):
    pipe = pipeline(tmp_path)
    assert main(["submit", str(pipe)]) == 0
    wid = submitted_id(capsys.readouterr().out)
    wf = argo.workflows[wid]
    by_task, key = {}, {}  # step keys hold a hash of the step's inputs: pretrain-h..., test-{{item}}-h...
    for t in wf["spec"]["templates"]:
        for task in t.get("dag", {}).get("tasks", []):
            by_task[task["name"]] = task["template"]
            pars = {p["name"]: p.get("value") for p in (task.get("arguments") or {}).get("parameters", [])}
            key[task["name"]] = pars.get("dflow_key")
    pre_key, test_key = key["pretrain"], lambda i: key["test"].replace("{{item}}", str(i))  # noqa: E731
    summary = {"name": "summary", "value": json.dumps({"kind": "single-task", "heads": {}})}
    wf["status"] = {"phase": "Failed", "nodes": {n["id"]: n for n in [
        node(wf, by_task["pretrain"], pre_key, "Succeeded",
             {"parameters": [summary], "artifacts": [{"name": "model", "s3": {"key": f"{wid}/pretrain/model"}}]}),
        node(wf, by_task["test"], test_key(0), "Succeeded",
             {"parameters": [summary], "artifacts": [{"name": "report", "s3": {"key": f"{wid}/test-0/report"}}]}),
        node(wf, by_task["test"], test_key(1), "Failed"),
    ]}}
    assert main(["status", wid]) == 0
    st = capsys.readouterr().out
    assert f"{wid} (argo): Failed" in st and "test-1 [ch4b]" in st

    assert main(["retry", wid]) == 0
    out = capsys.readouterr().out
    assert "reusing 2 succeeded step(s): pretrain, test-0" in out
    new = submitted_id(out)
    manifest = argo.posts("/api/v1/workflows/")[-1]["body"]["workflow"]
    assert manifest["metadata"]["name"] == new  # dflow names a memoized workflow itself
    cms = {c["metadata"]["name"]: c for c in argo.configmaps}
    assert set(cms) == {f"dflow-{new}-{pre_key}", f"dflow-{new}-{test_key(0)}"}  # one per reused step, none for test-1
    assert all(c["metadata"]["labels"]["workflows.argoproj.io/configmap-type"] == "Cache" for c in cms.values())
    steps = [t for t in manifest["spec"]["templates"] if "script" in t and not t["name"].endswith("init-artifact")]
    for t in steps:
        assert t["memoize"]["key"] == f"{new}-{{{{inputs.parameters.dflow_key}}}}"
        assert t["memoize"]["cache"]["configMap"]["name"] == f"dflow-{new}-{{{{inputs.parameters.dflow_key}}}}"
    meta = json.loads(manifest["metadata"]["annotations"]["lamflow.io/spec"])
    assert meta["parent"] == wid and meta["checkpoint_run"] == wid
    # a rerun training step resumes from the checkpoints the first run synced, not from its own (empty) keys
    pre = next(task for t in manifest["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"]
               if task["name"] == "pretrain")
    store = json.loads(next(p["value"] for p in pre["arguments"]["parameters"] if p["name"] == "checkpoint_store"))
    assert store["key"] == f"lamflow/checkpoints/{wid}/{pre_key}"  # the hashed step key: changed settings start afresh
    first = next(task for t in wf["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"] if task["name"] == "pretrain")
    assert f"lamflow/checkpoints/{{{{workflow.name}}}}/{pre_key}" in json.dumps(first["arguments"])
    text = json.dumps(manifest) + json.dumps(argo.configmaps)
    for k, v in SECRETS.items():
        assert v not in text, f"{k} leaked"

    from test_render import schema_errors

    assert schema_errors(manifest) == []


def test_s3_datasets_are_fetched_checked_and_staged(tmp_path, argo, s3, monkeypatch, capsys):
    _, client = s3
    monkeypatch.setenv("LAMFLOW_CACHE", str(tmp_path / "cache"))
    for split in ("train", "valid"):
        src = data_path("ch4_pbe", split)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            client.fput_object(BUCKET, f"datasets/ch4/{split}/{f.relative_to(src).as_posix()}", str(f))
    doc = yaml.safe_load(pipeline(tmp_path).read_text())
    doc["type_map"] = ["H", "C"]
    doc["datasets"] = {"ch4": {"train": f"s3://{BUCKET}/datasets/ch4/train", "valid": f"s3://{BUCKET}/datasets/ch4/valid"}}
    doc["stages"]["test"] = {}
    p = tmp_path / "s3.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main(["submit", str(p)]) == 0
    assert (tmp_path / "cache" / "s3" / BUCKET / "datasets" / "ch4" / "train" / "set.000" / "force.npy").is_file()
    manifest = argo.posts("/api/v1/workflows/")[-1]["body"]["workflow"]
    (key,) = {a["s3"]["key"] for t in manifest["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"]
              for a in task.get("arguments", {}).get("artifacts", []) if "s3" in a and a["s3"]["key"].endswith("/data.tgz")}
    names = tarfile.open(fileobj=io.BytesIO(client.get_object(BUCKET, key).read()), mode="r:gz").getnames()
    assert any(n.endswith("ch4/valid/0/set.000/energy.npy") for n in names)

    # a broken label in the S3 copy is found before anything is submitted
    import numpy as np

    f = tmp_path / "cache" / "s3" / BUCKET / "datasets" / "ch4" / "valid" / "set.000" / "energy.npy"
    e = np.load(f)
    e[2] = np.nan
    np.save(tmp_path / "bad.npy", e)
    import time

    time.sleep(1.1)  # S3 times have one-second resolution
    client.fput_object(BUCKET, "datasets/ch4/valid/set.000/energy.npy", str(tmp_path / "bad.npy"))  # same size, new content
    n = len(argo.posts("/api/v1/workflows/"))
    assert main(["submit", str(p)]) == 1
    assert "frame 2: energy contains NaN" in capsys.readouterr().err
    assert len(argo.posts("/api/v1/workflows/")) == n


def test_status_list_logs_and_download_of_an_argo_run(tmp_path, argo, s3, capsys):
    _, client = s3
    pipe = pipeline(tmp_path)
    assert main(["submit", str(pipe)]) == 0
    wid = submitted_id(capsys.readouterr().out)
    wf = argo.workflows[wid]
    by_task = {task["name"]: task["template"] for t in wf["spec"]["templates"] for task in t.get("dag", {}).get("tasks", [])}
    summary = {"name": "summary", "value": json.dumps({"test": {}})}
    key = f"{wid}/report/report"
    client.put_object(BUCKET, f"{key}/report/report.md", io.BytesIO(b"# report\n"), 9)
    wf["status"] = {"phase": "Succeeded", "nodes": {n["id"]: n for n in [
        node(wf, by_task["report"], "report", "Succeeded",
             {"parameters": [summary], "artifacts": [{"name": "report", "s3": {"key": key}}]})]}}
    assert main(["list"]) == 0
    assert wid in capsys.readouterr().out
    assert main(["logs", wid, "report"]) == 0
    out = capsys.readouterr().out
    assert "==> report <==" in out and "step log line 2" in out
    log_req = [r for r in argo.requests if r["path"].startswith(f"/api/v1/workflows/lamflow/{wid}/log")][-1]
    assert "podName=" in log_req["path"] and log_req["headers"]["Authorization"] == f"Bearer {SECRETS['LAMFLOW_ARGO_TOKEN']}"
    assert main(["download", wid, "-o", str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "report.md").read_text() == "# report\n"


# water brings O into the type map: one neighbour count per element (H, C, O)
TINY3 = {**TINY, "model": {**TINY["model"], "descriptor": {**TINY["model"]["descriptor"], "sel": [8, 4, 4]}}}


def test_each_fan_out_step_fetches_only_its_own_system(tmp_path, argo, s3, capsys):
    """Bytes per step: the test fan-out's pods get the item-th per-system artifact (one dataset),
    not the whole data upload that the pretrain step reads."""
    _, client = s3
    ch4 = {"train": str(data_path("ch4_pbe", "train")), "valid": str(data_path("ch4_pbe", "valid"))}
    water = {"train": str(data_path("water_h2o", "train")), "valid": str(data_path("water_h2o", "valid"))}
    doc = {"name": "bytes-demo", "datasets": {"ch4": ch4, "water": water}, "resources": {"image": IMAGE},
           "stages": {"pretrain": {"datasets": ["ch4"], **TINY3}, "test": {"systems": ["ch4", "water"]}}}
    p = tmp_path / "bytes.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main(["submit", str(p)]) == 0
    manifest = argo.posts("/api/v1/workflows/")[-1]["body"]["workflow"]
    refs = {task["name"]: {a["name"]: a["s3"]["key"] for a in task.get("arguments", {}).get("artifacts", []) if "s3" in a}
            for t in manifest["spec"]["templates"] if "dag" in t for task in t["dag"]["tasks"]}
    size = lambda key: client.stat_object(BUCKET, key).size  # noqa: E731
    fetched = {"pretrain": size(refs["pretrain"]["data"])}
    for i, name in enumerate(["ch4", "water"]):
        key = refs["test"]["data"].replace("{{item}}", str(i))  # what Argo fetches for item i
        fetched[f"test-{i}"] = size(key)
        names = tarfile.open(fileobj=io.BytesIO(client.get_object(BUCKET, key).read()), mode="r:gz").getnames()
        datasets = {n.split("/")[-2] for n in names if n.endswith("/dataset.json")}
        assert datasets == {name}, (i, datasets)  # only its own dataset
        assert any(f"{name}/train/0/" in n and n.endswith("/coord.npy") for n in names)  # the frames themselves
    print(fetched)
    whole = fetched["pretrain"]
    assert fetched["test-0"] < 0.2 * whole  # ch4 (116 kB of 2 MB) alone
    assert fetched["test-1"] < whole and fetched["test-0"] + fetched["test-1"] <= 1.05 * whole

"""Checkpoints that outlive the pod, against a real S3 protocol server on loopback (moto):
  * a pretrain step is SIGKILLed mid-run after it synced step 4; the step started again in a
    fresh, empty folder resumes from the synced checkpoint, and its final weights and learning
    curve are bit-identical to an uninterrupted run;
  * a corrupted, truncated or half-written generation is never picked up (restore falls back to
    the previous verified one, then to a fresh start)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, data_path

from lamflow.model.io.checkpoint import read_checkpoint
from lamflow.ops.checkpoint_store import CheckpointStore, StoreConfig
from lamflow.ops.common import stage_dataset

BUCKET = "lamflow-artifacts"
KEYS = {"LAMFLOW_S3_ACCESS_KEY": "ckpt-test-key", "LAMFLOW_S3_SECRET_KEY": "ckpt-test-secret-3b9d"}


@pytest.fixture()
def s3(monkeypatch):
    from minio import Minio
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    client = Minio(f"{host}:{port}", access_key=KEYS["LAMFLOW_S3_ACCESS_KEY"], secret_key=KEYS["LAMFLOW_S3_SECRET_KEY"],
                   secure=False)
    client.make_bucket(BUCKET)
    yield f"{host}:{port}", client
    server.stop()


def config(steps: int) -> dict:
    c = json.loads(json.dumps(TINY))
    c["training"].update(numb_steps=steps, save_freq=2, disp_freq=2)
    return c


# The step, as a separate process: it syncs to the store and hangs right after the sync of
# step 4, so the test can SIGKILL it at a known point (a preempted node gives no warning either).
CHILD = r"""
import json, sys, time
from pathlib import Path
import lamflow.ops.checkpoint_store as cs
from lamflow.ops.pretrain import run_pretrain

args = json.loads(sys.argv[1])

class HangsAfterStep4(cs.CheckpointStore):
    def save(self, work, step):
        m = super().save(work, step)
        if step == 4:
            Path(args["flag"]).write_text("synced 4")
            time.sleep(600)
        return m

cs.CheckpointStore = HangsAfterStep4
run_pretrain(args["config"], Path(args["data"]), ["ch4"], Path(args["out"]), type_map=["H", "C"],
             store=cs.StoreConfig.from_param(args["store"]), log=lambda *a: None)
"""


def curve_rows(path: Path) -> list[dict]:
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return [{k: v for k, v in r.items() if k.endswith(("_val", "_trn")) or k in ("step", "task", "lr", "loss")} for r in rows]


def test_killed_step_resumes_from_s3_in_a_fresh_folder_bit_identical(tmp_path, s3):
    from lamflow.ops.pretrain import run_pretrain

    endpoint, client = s3
    data = tmp_path / "data"
    stage_dataset(data, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))]})
    store = StoreConfig(endpoint, BUCKET, "lamflow/checkpoints/wf-abcde/pretrain")
    cfg = config(10)

    run_pretrain(cfg, data, ["ch4"], tmp_path / "uninterrupted", type_map=["H", "C"], log=lambda *a: None)

    flag = tmp_path / "synced"
    args = {"config": cfg, "data": str(data), "out": str(tmp_path / "pod1"), "store": store.to_param(), "flag": str(flag)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert child.poll() is None, child.stdout.read()[-3000:]
            assert time.time() < deadline, "the step never synced step 4"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)  # the node is gone: no cleanup runs
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert CheckpointStore(store).latest()["step"] == 4

    lines = []
    fresh = tmp_path / "pod2"  # a new pod: nothing local survives
    run_pretrain(cfg, data, ["ch4"], fresh, type_map=["H", "C"], store=store, log=lines.append)
    assert any("restored step 4" in ln for ln in lines), lines
    assert any("restarting from" in ln and "at step 4" in ln for ln in lines), lines

    a, b = read_checkpoint(tmp_path / "uninterrupted" / "model.ckpt"), read_checkpoint(fresh / "model.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert curve_rows(tmp_path / "uninterrupted" / "lcurve.csv") == curve_rows(fresh / "lcurve.csv")
    m = CheckpointStore(store).latest()
    assert m["step"] == 10 and set(m["files"]) == {"model.ckpt", "lcurve.csv"}
    names = {o.object_name for o in client.list_objects(BUCKET, prefix=store.key + "/", recursive=True)}
    assert not [n for n in names if "/tmp/" in n]  # no temporary object is left behind
    assert {n.split("/")[-2] for n in names if "/step-" in n} == {"step-000000000008", "step-000000000010"}


def fake_checkpoint(work: Path, step: int) -> bytes:
    work.mkdir(parents=True, exist_ok=True)
    blob = f"checkpoint of step {step} ".encode() * 1000
    (work / "model.ckpt").write_bytes(blob)
    (work / "lcurve.csv").write_text(f"step\n{step}\n")
    return blob


def test_corrupted_or_partial_uploads_are_never_picked_up(tmp_path, s3):
    endpoint, client = s3
    cs = CheckpointStore(StoreConfig(endpoint, BUCKET, "lamflow/checkpoints/wf-x/finetune/ch4"), log=lambda *a: None)
    assert cs.restore(tmp_path / "empty") is None  # nothing stored: a fresh start
    b2 = fake_checkpoint(tmp_path / "w", 2)
    cs.save(tmp_path / "w", 2)
    b4 = fake_checkpoint(tmp_path / "w", 4)
    cs.save(tmp_path / "w", 4)

    assert cs.restore(tmp_path / "r0") == 4 and (tmp_path / "r0" / "model.ckpt").read_bytes() == b4

    # a killed upload of step 6: its object (and a temporary one) exist, the manifest does not name it
    import io

    client.put_object(BUCKET, cs._k("step-000000000006/model.ckpt"), io.BytesIO(b"half"), 4)
    client.put_object(BUCKET, cs._k("tmp/0123abcd"), io.BytesIO(b"partial"), 7)
    assert cs.restore(tmp_path / "r1") == 4

    # step 4's object truncated behind the manifest's back: its sha256 fails, step 2 is used
    client.put_object(BUCKET, cs._k("step-000000000004/model.ckpt"), io.BytesIO(b4[:100]), 100)
    lines = []
    cs.log = lines.append
    assert cs.restore(tmp_path / "r2") == 2
    assert (tmp_path / "r2" / "model.ckpt").read_bytes() == b2
    assert any("size/sha256 differ" in ln for ln in lines), lines
    assert not list((tmp_path / "r2").glob(".*.restore"))

    # same size, other bytes (bit rot): still refused; then nothing verified is left
    client.put_object(BUCKET, cs._k("step-000000000002/model.ckpt"), io.BytesIO(b"x" * len(b2)), len(b2))
    assert cs.restore(tmp_path / "r3") is None
    assert not (tmp_path / "r3" / "model.ckpt").exists()

    # a manifest that is not JSON is ignored, not a crash
    client.put_object(BUCKET, cs._k("manifest.json"), io.BytesIO(b"{not json"), 9)
    assert cs.latest() is None and cs.restore(tmp_path / "r4") is None

    # the next sync clears what the killed uploads left behind
    fake_checkpoint(tmp_path / "w", 10)
    cs.save(tmp_path / "w", 10)
    names = {o.object_name for o in client.list_objects(BUCKET, prefix=cs._k(""), recursive=True)}
    assert not [n for n in names if "/tmp/" in n or "step-000000000006" in n], names
    assert cs.restore(tmp_path / "r5") == 10

    # a local checkpoint (debug resume folder, same pod) wins over the store
    fake_checkpoint(tmp_path / "local", 9)
    assert cs.restore(tmp_path / "local") is None and b"step 9" in (tmp_path / "local" / "model.ckpt").read_bytes()


def test_store_without_credentials_fails_in_one_line(monkeypatch):
    from lamflow.ops.checkpoint_store import StoreError

    monkeypatch.delenv("LAMFLOW_S3_SECRET_KEY", raising=False)
    with pytest.raises(StoreError, match="LAMFLOW_S3_ACCESS_KEY / LAMFLOW_S3_SECRET_KEY are not set"):
        CheckpointStore(StoreConfig("127.0.0.1:9", BUCKET, "k"))

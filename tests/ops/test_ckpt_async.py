"""Checkpoint uploads run in the background, against moto S3 on loopback: the training thread
returns from the save hook while the upload is still running, the upload sends the bytes saved at
that step even when the trainer has replaced model.ckpt since, the next save waits for the
previous upload, and a failed upload fails the step at the next save."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from test_ckpt_sync import BUCKET, s3  # noqa: F401  (s3 is a fixture)

from lamflow.ops.checkpoint_store import AsyncSync, CheckpointStore, StoreConfig


def save_like_the_trainer(work: Path, step: int) -> bytes:
    """model.ckpt and lcurve.csv written as the trainer does: temp file + os.replace."""
    work.mkdir(parents=True, exist_ok=True)
    blob = f"checkpoint of step {step} ".encode() * 2000
    for name, data in (("model.ckpt", blob), ("lcurve.csv", f"step\n{step}\n".encode())):
        tmp = work / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, work / name)
    return blob


class GatedStore(CheckpointStore):
    """Each upload waits until the test opens the gate (a slow network, under control)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gate, self.started, self.order = threading.Event(), threading.Event(), []

    def save(self, work, step):
        self.started.set()
        assert self.gate.wait(30)
        self.order.append(step)
        return super().save(work, step)


def test_uploads_run_in_the_background_one_at_a_time_with_the_saved_bytes(tmp_path, s3):  # noqa: F811
    endpoint, _ = s3
    store = GatedStore(StoreConfig(endpoint, BUCKET, "lamflow/checkpoints/wf-a/pretrain"), log=lambda *a: None)
    hook = store.hook()
    assert isinstance(hook, AsyncSync)
    work = tmp_path / "work"
    b2 = save_like_the_trainer(work, 2)
    hook(work / "model.ckpt", 2)  # returns while the upload of step 2 is held at the gate
    assert store.started.wait(10) and hook.thread.is_alive() and store.latest() is None
    b4 = save_like_the_trainer(work, 4)  # training went on and saved again before the upload ran
    store.gate.set()
    hook(work / "model.ckpt", 4)  # waits for step 2's upload, then starts step 4's
    hook.wait()
    assert store.order == [2, 4] and store.latest()["step"] == 4
    assert store.restore(tmp_path / "r4") == 4 and (tmp_path / "r4" / "model.ckpt").read_bytes() == b4
    prev = store._read_manifest("manifest.prev.json")
    assert prev["step"] == 2
    resp = store.client.get_object(BUCKET, prev["files"]["model.ckpt"]["key"])
    assert resp.read() == b2  # the bytes of step 2's save, not the file that replaced them
    resp.close()
    assert not (work / AsyncSync.SNAPSHOT).exists()  # the snapshot is gone after its upload


def test_a_failed_background_upload_fails_the_next_save(tmp_path, s3):  # noqa: F811
    endpoint, client = s3
    lines: list[str] = []
    store = CheckpointStore(StoreConfig(endpoint, "no-such-bucket", "k/pretrain"), client=client, log=lines.append)
    hook = store.hook()
    work = tmp_path / "work"
    save_like_the_trainer(work, 2)
    hook(work / "model.ckpt", 2)
    hook.thread.join()
    assert any("sync of step 2" in ln and "failed" in ln for ln in lines), lines
    save_like_the_trainer(work, 4)
    with pytest.raises(Exception, match="(?i)bucket"):
        hook(work / "model.ckpt", 4)
    hook.wait()  # the error was handed over once

"""Many processes, many nodes, for real on loopback:
  * two `torchrun` launchers acting as two nodes (--nnodes 2, c10d rendezvous on 127.0.0.1,
    gloo, one process each) run the worker that a TrainJob's node pods run, and train the same
    weights as one process with the same global batch (2 x batch 2 == 1 x batch 4), single- and
    multi-task;
  * the pretrain OP with nproc 2 (what `resources.gpus: 2` gives a pod; gloo on CPU) trains the
    same weights as the OP in one process with the doubled batch.
The test starts both launchers itself and kills them on failure or timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from test_ddp import ch4, curve, multi_task, single_task  # noqa: F401  (ch4 is a fixture)

from lamflow.model.io.checkpoint import load_model
from lamflow.model.schema import parse_config
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.multitask import train_multitask
from lamflow.model.training.multitask_config import parse_multitask_config
from lamflow.model.training.trainer import train

TIMEOUT = 120  # s, per launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(kind, cfg, out):
    if kind == "single":
        return train(parse_config(TrainConfig, cfg, "test"), out, log=lambda *a: None)
    return train_multitask(parse_multitask_config(cfg, "test"), out, log=lambda *a: None)


def two_nodes(kind, cfg, tmp_path):
    """Node 0 and node 1 as two launchers (separate output folders, as two pods would have)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs, outs = [], []
    try:
        for node in (0, 1):
            out = tmp_path / f"node{node}"
            out.mkdir()
            job = out / "job.json"
            job.write_text(json.dumps({"kind": "multitask" if kind == "multi" else "single", "config": cfg,
                                       "out": str(out), "store": {}}))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=loopback-test",
                   "--max_restarts=0", "-m", "lamflow.ops.torchrun", "worker", str(job)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            outs.append(out)
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return outs, logs


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_two_torchrun_nodes_on_loopback_match_one_process_with_the_same_global_batch(ch4, tmp_path, kind):  # noqa: F811
    make = single_task if kind == "single" else multi_task
    one = one_process(kind, make(ch4, 4), tmp_path / "one")
    outs, logs = two_nodes(kind, make(ch4, 2), tmp_path)
    # global rank 0 (whichever node the rendezvous made it) writes the model; the other writes nothing
    written = [o for o in outs if (o / "model.ckpt").is_file()]
    assert len(written) == 1, [sorted(p.name for p in o.iterdir()) for o in outs]
    two = written[0]
    a, b = curve(one.out_dir / "lcurve.csv"), curve(two / "lcurve.csv")
    assert [r["task"] for r in a] == [r["task"] for r in b] and len(a) == 4
    for ra, rb in zip(a, b):
        for k in ra:
            if k.endswith("_val"):
                assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-7), (ra["step"], k)
    ma, mb = load_model(one.checkpoint), load_model(two / "model.ckpt")
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(w, v, rtol=1e-7, atol=1e-9, msg=k)


def test_pretrain_op_with_two_processes_matches_one_process(tmp_path):
    from conftest import data_path

    from lamflow.ops.common import stage_dataset
    from lamflow.ops.pretrain import run_pretrain
    from lamflow.ops.training import launcher_for

    root = tmp_path / "data"
    stage_dataset(root, "ch4", {"train": [str(data_path("ch4_pbe", "train"))], "valid": [str(data_path("ch4_pbe", "valid"))]})

    def config(batch):
        c = json.loads(json.dumps(TINY))
        c["training"].update(training_data={"batch_size": batch}, device="cpu")
        c["learning_rate"]["scale_by_worker"] = "none"
        return c

    lines = []
    run_pretrain(config(4), root, ["ch4"], tmp_path / "one", type_map=["H", "C"], log=lambda *a: None)
    s2 = run_pretrain(config(2), root, ["ch4"], tmp_path / "two", type_map=["H", "C"], launcher=launcher_for(2),
                      log=lines.append)
    assert any("--nproc_per_node=2" in ln for ln in lines)  # it really ran under torchrun
    assert sum("model: se_e2_a" in ln for ln in lines) == 1  # one rank logs
    assert s2["steps"] == TINY["training"]["numb_steps"] and s2["heads"]["ch4"]["rmse_f"] > 0
    ma, mb = load_model(tmp_path / "one" / "model.ckpt"), load_model(tmp_path / "two" / "model.ckpt")
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(w, v, rtol=1e-7, atol=1e-9, msg=k)
    assert launcher_for(1) is None
